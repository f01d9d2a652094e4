//! The TRM schema as migrations, for the demo and the tests. The host itself
//! never runs them: in production the tables belong to Directus and the
//! durable-write processor.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgPool, SqlSafeStr};

const MIGRATIONS: [(i64, &str, &str); 2] = [
    (
        1,
        "trm schema",
        include_str!("../../migrations/0001_trm_schema.sql"),
    ),
    (
        2,
        "timescaledb",
        include_str!("../../migrations/0002_timescaledb.sql"),
    ),
];

/// The migrations, embedded in the binary so the demo runs from anywhere.
pub fn migrator() -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(
                version,
                Cow::Borrowed(description),
                MigrationType::Simple,
                sql.into_sql_str(),
                false,
            )
        })
        .collect::<Vec<_>>();
    Migrator {
        migrations: Cow::Owned(migrations),
        // Tests migrate many schemas of one database at once; the advisory
        // lock is per database and would serialize them for nothing.
        locking: false,
        ..Migrator::DEFAULT
    }
}

/// Applies the migrations to the pool's database (its `search_path` schema).
pub async fn migrate(db: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    migrator().run(db).await
}

/// Creates database `name` on the server of `server_url` when it is
/// missing (the demo's and the benchmarks' own), and returns its URL.
pub async fn ensure_database(server_url: &str, name: &str) -> anyhow::Result<String> {
    let opts: PgConnectOptions = server_url.parse()?;
    let mut admin = opts.connect().await.map_err(|e| {
        anyhow::anyhow!("cannot reach PostgreSQL at {server_url} (POSTGRES_URL): {e}")
    })?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut admin)
        .await?;
    if exists.is_none() {
        // A name cannot be a bind parameter; ours are fixed identifiers.
        let create = format!("CREATE DATABASE \"{}\"", name.replace('"', ""));
        sqlx::query(sqlx::AssertSqlSafe(create))
            .execute(&mut admin)
            .await?;
    }
    admin.close().await?;
    Ok(opts.database(name).to_url_lossy().to_string())
}
