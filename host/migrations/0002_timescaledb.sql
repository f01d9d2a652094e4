-- Production runs positions as a TimescaleDB hypertable. Where the extension
-- is installed (and preloaded) the dev schema does the same; elsewhere it
-- stays a plain PostgreSQL table, which the host reads the same way.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
            PERFORM create_hypertable('positions', 'ts', if_not_exists => TRUE);
        EXCEPTION WHEN OTHERS THEN
            RAISE NOTICE 'TimescaleDB not usable here (%); positions stays a plain table', SQLERRM;
        END;
    END IF;
END $$;
