//! `strangler init` writes files that the config check accepts and the router
//! serves in front of a real monolith (the example shop on its own PostgreSQL).

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strangler_testkit::{Postgres, free_port};
use support::strangler_bin;

fn init(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(strangler_bin())
        .arg("init")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("strangler init")
}

#[tokio::test]
async fn init_writes_a_config_the_router_serves_in_front_of_the_example_shop() {
    let pg = Postgres::start().await.expect("postgres");
    pg.create_database("legacy").await.expect("db");
    let db = strangler_example::connect(&pg.url("legacy"))
        .await
        .expect("connect");
    strangler_example::legacy::migrate(&db, true)
        .await
        .expect("migrate");
    let shop_port = free_port().expect("port");
    let shop_addr: std::net::SocketAddr = format!("127.0.0.1:{}", shop_port.port())
        .parse()
        .expect("addr");
    drop(shop_port);
    let shop = tokio::spawn(strangler_example::serve(
        shop_addr,
        strangler_example::legacy::app(db),
    ));

    let dir = tempfile::tempdir().expect("dir");
    let (listen, admin) = (free_port().expect("port"), free_port().expect("port"));
    let listen_at = format!("127.0.0.1:{}", listen.port());
    let admin_at = format!("127.0.0.1:{}", admin.port());
    let legacy_url = format!("http://{shop_addr}");
    let args = [
        "--legacy",
        legacy_url.as_str(),
        "--new",
        "127.0.0.1:4000",
        "--route",
        "orders=/api/orders",
        "--listen",
        listen_at.as_str(),
        "--admin",
        admin_at.as_str(),
    ];
    let out = init(dir.path(), &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in ["strangler.toml", "flags.json", "collector.toml"] {
        assert!(dir.path().join(file).exists(), "{file} written");
    }

    // Running it again does not touch the files; --force rewrites them.
    std::fs::write(dir.path().join("flags.json"), "edited").expect("edit");
    let again = init(dir.path(), &args);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("--force") && err.contains("already exist"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("flags.json")).expect("read"),
        "edited"
    );
    let forced = init(dir.path(), &[&args[..], &["--force"]].concat());
    assert!(forced.status.success());
    assert_ne!(
        std::fs::read_to_string(dir.path().join("flags.json")).expect("read"),
        "edited"
    );

    // The config check accepts it; the collector config loads.
    let check = Command::new(strangler_bin())
        .args(["config", "check"])
        .arg(dir.path().join("strangler.toml"))
        .output()
        .expect("check");
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    strangler_collector::CollectorConfig::load(Some(&dir.path().join("collector.toml")))
        .expect("collector config");

    // The router serves the shop's pages through it, every route on legacy.
    drop((listen, admin));
    let mut router = Command::new(strangler_bin())
        .args(["router", "run", "--config"])
        .arg(dir.path().join("strangler.toml"))
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("router");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !client
        .get(format!("http://{admin_at}/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "the router never got ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let home = client
        .get(format!("http://{listen_at}/"))
        .send()
        .await
        .expect("home");
    assert_eq!(home.status().as_u16(), 200);
    assert!(home.text().await.expect("text").contains("Legacy Shop"));
    let order = client
        .get(format!("http://{listen_at}/api/orders/1"))
        .header("x-user-id", "7")
        .send()
        .await
        .expect("order");
    assert_eq!(order.status().as_u16(), 200);
    assert_eq!(
        order
            .headers()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok()),
        Some("legacy-shop")
    );
    let _ = router.kill();
    let _ = router.wait();

    // The Unleash variant: no flags.json, flags from Unleash; the check accepts it.
    let unleash_dir = tempfile::tempdir().expect("dir");
    let out = init(
        unleash_dir.path(),
        &[
            "--legacy",
            "127.0.0.1:3000",
            "--unleash",
            "http://127.0.0.1:4242/api/",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!unleash_dir.path().join("flags.json").exists());
    let check = Command::new(strangler_bin())
        .args(["config", "check"])
        .arg(unleash_dir.path().join("strangler.toml"))
        .env(
            "UNLEASH_CLIENT_TOKEN",
            "default:development.unleash-insecure-api-token",
        )
        .output()
        .expect("check");
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    shop.abort();
}
