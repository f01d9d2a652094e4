//! The snapshot query does one index descent per device, never a scan of a
//! device's history (upstream.md), on a table big enough for the planner to
//! mean it.

use livecast::test_util::SNAPSHOT_SQL;
use livecast_tests::*;

#[tokio::test]
async fn the_snapshot_query_descends_the_index_once_per_device() {
    const DEVICES: i64 = 500;
    const ROWS_PER_DEVICE: i64 = 2_000;
    let env = TestEnv::new().await;
    let imeis: Vec<String> = (0..100).map(|i| format!("35000000000{i:04}")).collect();
    let refs: Vec<&str> = imeis.iter().map(String::as_str).collect();
    let event = env.event(&refs).await;
    // 1,000,000 rows: 500 devices × 2,000 fixes, one per second; every 7th faulty.
    sqlx::query(
        "INSERT INTO positions (device_id, ts, latitude, longitude, altitude, angle, speed, satellites, priority, attributes, codec, faulty) \
         SELECT '35000000000' || lpad(d::text, 4, '0'), to_timestamp(1767225600 + s), 41, 19, 100, 0, 50, 9, 0, '{}', '8E', s % 7 = 0 \
         FROM generate_series(0, $1 - 1) d, generate_series(0, $2 - 1) s",
    )
    .bind(DEVICES)
    .bind(ROWS_PER_DEVICE)
    .execute(&env.db)
    .await
    .expect("generate positions");
    sqlx::query("ANALYZE positions")
        .execute(&env.db)
        .await
        .expect("analyze");

    let plan: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {SNAPSHOT_SQL}"
    )))
    .bind(event)
    .fetch_all(&env.db)
    .await
    .expect("explain");
    let plan: String = plan.into_iter().map(|(l,)| l + "\n").collect();
    println!("{plan}");
    assert!(!plan.contains("Seq Scan on positions"), "{plan}");
    assert!(plan.contains("Limit"), "{plan}");
    // The latest non-faulty row of each device, read from the partial index,
    // one row per device: 100 loops of a single row.
    let scan = plan
        .lines()
        .find(|l| {
            l.contains("Index Scan using positions_faulty_idx on positions")
                || l.contains("Index Only Scan using positions_faulty_idx")
        })
        .unwrap_or_else(|| panic!("no scan of positions_faulty_idx:\n{plan}"));
    assert!(scan.contains("rows=1 loops=100"), "{scan}");

    let rows: Vec<String> = sqlx::query_scalar(SNAPSHOT_SQL)
        .bind(event)
        .fetch_all(&env.db)
        .await
        .expect("snapshot");
    assert_eq!(rows.len(), 100);
    // Rows are stream payloads; the last fix (s = 1999) is not faulty (1999 % 7 != 0).
    for row in &rows {
        let p = livecast::test_util::Position::decode(row.as_bytes()).expect("a valid payload");
        assert_eq!(p.ts_ms, (1_767_225_600 + 1_999) * 1_000, "{row}");
    }
}
