//! The TRM schema as migrations, for the demo and the tests. The host itself
//! never runs them: in production the tables belong to Directus and the
//! durable-write processor.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{PgPool, SqlSafeStr};

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
