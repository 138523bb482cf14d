//! The example against real PostgreSQL: the legacy shop, CDC with the example's
//! mappings, and the orders service reading what CDC copied.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use strangler_testkit::{Postgres, free_port};

async fn spawn(app: axum::Router) -> String {
    let port = free_port().expect("port");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", port.port()).parse().expect("addr");
    drop(port);
    tokio::spawn(strangler_example::serve(addr, app));
    let url = format!("http://{addr}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while reqwest::get(format!("{url}/health")).await.is_err() {
        assert!(Instant::now() < deadline, "{url} never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    url
}

fn example_cdc_config(legacy: &str, orders: &str) -> strangler_cdc::CdcConfig {
    example_config("cdc.toml", legacy, orders)
}

fn example_config(file: &str, legacy: &str, orders: &str) -> strangler_cdc::CdcConfig {
    let text =
        std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).expect(file);
    let text = text
        .replace("postgres://postgres@127.0.0.1:5433/legacy", legacy)
        .replace("postgres://postgres@127.0.0.1:5434/orders", orders);
    strangler_cdc::CdcConfig::parse(&text, std::path::Path::new("cdc.toml"))
        .expect("example cdc.toml")
}

/// Runs one CDC direction until `stop`.
fn start_cdc(
    config: strangler_cdc::CdcConfig,
    stop: &strangler_cdc::CancellationToken,
) -> tokio::task::JoinHandle<Result<(), strangler_cdc::CdcError>> {
    let stop = stop.clone();
    tokio::spawn(async move {
        let options = strangler_cdc::pipeline::RunOptions {
            stop: Some(stop),
            ..Default::default()
        };
        strangler_cdc::run(&config, options).await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_orders_service_answers_like_the_shop_except_for_the_deliberate_difference() {
    let (a, b) = tokio::join!(Postgres::start(), Postgres::start());
    let (a, b) = (a.expect("legacy pg"), b.expect("orders pg"));
    a.create_database("legacy").await.expect("db");
    b.create_database("orders").await.expect("db");
    let legacy_db = strangler_example::connect(&a.url("legacy"))
        .await
        .expect("legacy");
    let orders_db = strangler_example::connect(&b.url("orders"))
        .await
        .expect("orders");
    strangler_example::legacy::migrate(&legacy_db, true)
        .await
        .expect("seed");
    strangler_example::orders::migrate(&orders_db)
        .await
        .expect("schema");
    let shop = spawn(strangler_example::legacy::app(legacy_db.clone())).await;

    let config = example_cdc_config(&a.url("legacy"), &b.url("orders"));
    let stop = strangler_cdc::CancellationToken::new();
    let cdc = start_cdc(config, &stop);
    // The reverse direction starts once the forward snapshot is in.
    let deadline = Instant::now() + Duration::from_secs(30);
    while orders_db
        .query_opt("SELECT 1 FROM strangler.cdc_checkpoint", &[])
        .await
        .ok()
        .flatten()
        .is_none()
    {
        assert!(Instant::now() < deadline, "forward snapshot never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reverse = example_config("cdc-reverse.toml", &a.url("legacy"), &b.url("orders"));
    let rev = start_cdc(reverse, &stop);
    let new_v1 = spawn(strangler_example::orders::app(orders_db.clone(), false)).await;
    let new_fixed = spawn(strangler_example::orders::app(orders_db.clone(), true)).await;
    let client = reqwest::Client::new();

    // An order placed in the shop reaches the new database through CDC.
    let placed: Value = client
        .post(format!("{shop}/api/orders"))
        .json(&json!({"customer_id": 7, "items": [{"product_id": 3, "qty": 2}, {"product_id": 5, "qty": 1}]}))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    let id = placed["id"].as_i64().expect("id");
    let deadline = Instant::now() + Duration::from_secs(30);
    let from_new = loop {
        let r = client
            .get(format!("{new_fixed}/api/orders/{id}"))
            .send()
            .await
            .expect("get");
        if r.status() == 200 {
            break r.json::<Value>().await.expect("json");
        }
        assert!(
            Instant::now() < deadline,
            "order {id} never reached the orders service"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let from_shop: Value = client
        .get(format!("{shop}/api/orders/{id}"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(
        from_shop, from_new,
        "the fixed service answers exactly like the shop"
    );
    assert_eq!(from_shop["email"], "customer7@example.com");

    let v1: Value = client
        .get(format!("{new_v1}/api/orders/{id}"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(
        from_shop["total"],
        Value::String(from_shop["total"].as_str().expect("text").to_string())
    );
    assert!(v1["total"].is_number(), "the deliberate difference: {v1}");
    let mut same = v1.clone();
    same["total"] = from_shop["total"].clone();
    assert_eq!(same, from_shop, "and nothing else differs");

    // Orders placed in the new service get ids from their own range, prices from
    // the catalog and the e-mail from buyers, both copied by CDC.
    let created = client
        .post(format!("{new_fixed}/api/orders"))
        .json(&json!({"customer_id": 9, "items": [{"product_id": 3, "qty": 2}]}))
        .send()
        .await
        .expect("post");
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.expect("json");
    assert!(created["id"].as_i64().expect("id") >= 1_000_000);
    assert_eq!(created["email"], "customer9@example.com");
    let price: Value = client
        .get(format!("{shop}/api/products"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    let p3 = price
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["id"] == 3))
        .expect("product 3");
    let unit: f64 = p3["price"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("price");
    let total: f64 = created["total"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("total");
    assert!((total - 2.0 * unit).abs() < 0.001, "{created}");

    // ... and reaches the legacy database through the reverse direction, exactly once.
    let new_id = created["id"].as_i64().expect("id");
    let deadline = Instant::now() + Duration::from_secs(30);
    let in_legacy: Value = loop {
        let r = client
            .get(format!("{shop}/api/orders/{new_id}"))
            .send()
            .await
            .expect("get");
        if r.status() == 200 {
            break r.json().await.expect("json");
        }
        assert!(
            Instant::now() < deadline,
            "order {new_id} never reached the legacy database"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        in_legacy, created,
        "the legacy shop shows the new service's order identically"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let legacy_new: i64 = legacy_db
        .query_one("SELECT count(*) FROM orders WHERE id >= 1000000", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(legacy_new, 1);
    let (n_new, n_legacy): (i64, i64) = (
        orders_db
            .query_one("SELECT count(*) FROM orders_v2", &[])
            .await
            .expect("count")
            .get(0),
        legacy_db
            .query_one("SELECT count(*) FROM orders", &[])
            .await
            .expect("count")
            .get(0),
    );
    assert_eq!(n_new, n_legacy, "no order bounced or went missing");

    // Unknown customers and empty orders are refused, not stored.
    let bad = client
        .post(format!("{new_fixed}/api/orders"))
        .json(&json!({"customer_id": 999, "items": [{"product_id": 1, "qty": 1}]}))
        .send()
        .await
        .expect("post");
    assert_eq!(bad.status(), 422);
    let bad = client
        .post(format!("{shop}/api/orders"))
        .json(&json!({"customer_id": 1, "items": []}))
        .send()
        .await
        .expect("post");
    assert_eq!(bad.status(), 422);
    let page = client
        .get(format!("{shop}/customers/7"))
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("html");
    assert!(page.contains(&format!("#{id}")), "{page}");

    stop.cancel();
    cdc.await.expect("task").expect("cdc");
    rev.await.expect("task").expect("reverse cdc");
}
