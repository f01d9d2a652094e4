-- The TRM production schema the host reads (contract: upstream.md), for
-- development and tests only. In production Directus and the durable-write
-- processor own these tables; livecast never writes to them.

-- Directus-managed business collections (only the columns the host reads)
CREATE TABLE organizations (id uuid PRIMARY KEY, name text NOT NULL, slug text NOT NULL UNIQUE);
CREATE TABLE events        (id uuid PRIMARY KEY, organization_id uuid NOT NULL REFERENCES organizations(id),
                            name text NOT NULL, slug text NOT NULL, starts_at timestamptz, ends_at timestamptz);
CREATE TABLE devices       (id uuid PRIMARY KEY, imei text NOT NULL UNIQUE, model text NOT NULL);
CREATE TABLE entries       (id uuid PRIMARY KEY, event_id uuid NOT NULL REFERENCES events(id),
                            class_id uuid, race_number int, status text);
CREATE TABLE entry_devices (id uuid PRIMARY KEY, entry_id uuid NOT NULL REFERENCES entries(id),
                            device_id uuid NOT NULL REFERENCES devices(id), assigned_user_id uuid,
                            UNIQUE (entry_id, device_id));

-- Written by the durable-write processor; keyed by IMEI, not by devices.id
CREATE TABLE positions (device_id text NOT NULL, ts timestamptz NOT NULL,
                        latitude double precision NOT NULL, longitude double precision NOT NULL,
                        altitude real NOT NULL, angle real NOT NULL, speed real NOT NULL,
                        satellites smallint NOT NULL, priority smallint NOT NULL,
                        attributes jsonb NOT NULL, codec text NOT NULL,
                        ingested_at timestamptz NOT NULL DEFAULT now(),
                        faulty boolean NOT NULL DEFAULT false);
CREATE UNIQUE INDEX positions_device_ts ON positions (device_id, ts);
CREATE INDEX positions_ts ON positions (ts DESC);
CREATE INDEX positions_device_ts_idx ON positions (device_id, ts DESC);
CREATE INDEX positions_faulty_idx ON positions (device_id, ts DESC) WHERE faulty = false;
