//! Regression (found by the soak, cli/tests/soak.rs): the example's apps held one
//! database connection for good, so a PostgreSQL restart took the shop down until
//! it was restarted itself. A `Db` handle reopens it.

use strangler_testkit::Postgres;

#[tokio::test]
async fn the_handle_reopens_its_connection_after_a_database_restart() {
    let mut pg = Postgres::start().await.expect("postgres");
    pg.create_database("legacy").await.expect("db");
    let db = strangler_example::Db::connect(&pg.url("legacy"))
        .await
        .expect("connect");
    let one = |c: std::sync::Arc<tokio_postgres::Client>| async move {
        c.query_one("SELECT 1", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    };
    assert_eq!(one(db.get().await.expect("client")).await.ok(), Some(1));
    pg.restart().await.expect("restart");
    // The old connection is gone; the handle notices and reopens it (allow the
    // client a moment to see its socket closed).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Ok(client) = db.get().await
            && one(client).await.ok() == Some(1)
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
