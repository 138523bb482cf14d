//! Regression test for a harness bug the soak found (`SOAK_SEED=5`): PostgreSQL's
//! fast shutdown waits for each walsender to have its WAL confirmed, so a logical
//! replication client that stops reading (a CDC run stalled with SIGSTOP) made the
//! stop hang; the harness then SIGKILLed the postmaster alone, its children kept the
//! shared memory, and the restart failed ("pre-existing shared memory block is
//! still in use"). The stop now escalates to SIGQUIT (immediate shutdown, which
//! ends the children) before SIGKILL.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use strangler_testkit::Postgres;

/// Kills and reaps the client however the test ends.
struct Client(std::process::Child);

impl Drop for Client {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn postgres_restarts_with_its_data_while_a_logical_replication_client_is_stalled() {
    let mut pg = Postgres::start().await.expect("start postgres");
    let db = pg.connect("postgres").await.expect("connect");
    // Two round trips: a slot cannot be created in a transaction that wrote.
    db.batch_execute("CREATE TABLE kept (v int)")
        .await
        .expect("table");
    db.batch_execute("SELECT pg_create_logical_replication_slot('stalled', 'test_decoding')")
        .await
        .expect("slot");
    let recvlogical = [
        "/usr/lib/postgresql/15/bin/pg_recvlogical",
        "pg_recvlogical",
    ]
    .into_iter()
    .find(|p| {
        Command::new(p)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .expect("pg_recvlogical (Debian postgresql-client-15)");
    let client = Client(
        Command::new(recvlogical)
            .args([
                "-d",
                &pg.conninfo("postgres"),
                "--slot",
                "stalled",
                "--start",
            ])
            .args(["-f", "/dev/null", "-s", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pg_recvlogical"),
    );
    // Streaming: its walsender is up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while db
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            &[],
        )
        .await
        .map_or(0, |r| r.get::<_, i64>(0))
        < 1
    {
        assert!(Instant::now() < deadline, "pg_recvlogical never streamed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stalled, with WAL it has not confirmed.
    let pid = Pid::from_raw(i32::try_from(client.0.id()).expect("pid"));
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    db.batch_execute("INSERT INTO kept SELECT generate_series(1, 1000); CHECKPOINT;")
        .await
        .expect("write");
    drop(db);

    pg.restart()
        .await
        .expect("PostgreSQL comes back although a replication client stalled its stop");
    let db = pg.connect("postgres").await.expect("reconnect");
    let n: i64 = db
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .expect("read")
        .get(0);
    assert_eq!(n, 1000, "the rows written before the restart");
    drop(client);
}
