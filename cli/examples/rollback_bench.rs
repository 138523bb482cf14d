//! Rollback latency: from the start of `strangler route rollback` until every router
//! serves the route from legacy, observed by requests; and the same when only the
//! Unleash toggle is disabled (no override), at the default poll interval.
//!
//! Run through `bench/rollback.sh` (it builds in release first).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper_util::rt::TokioIo;
use strangler_testkit::{Unleash, free_port, unleash};

const ROUNDS: usize = 20;
const TOGGLE_ROUNDS: usize = 10;

async fn upstream(side: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        side.as_bytes(),
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn strangler_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/release/examples/rollback_bench -> target/release/strangler
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("strangler"))
        .expect("target dir")
}

struct Router {
    child: Child,
    port: u16,
    admin: u16,
    _leases: (strangler_testkit::PortLease, strangler_testkit::PortLease),
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_router(dir: &Path, name: &str, body: &str) -> Router {
    let (p, a) = (free_port().expect("port"), free_port().expect("port"));
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n{body}",
            p.port(),
            a.port()
        ),
    )
    .expect("write config");
    let child = Command::new(strangler_bin())
        .args(["router", "run", "--config"])
        .arg(&config)
        .env("UNLEASH_CLIENT_TOKEN", unleash::CLIENT_TOKEN)
        .env("STRANGLER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn router");
    Router {
        child,
        port: p.port(),
        admin: a.port(),
        _leases: (p, a),
    }
}

async fn side(client: &reqwest::Client, port: u16) -> String {
    match client
        .get(format!("http://127.0.0.1:{port}/api/orders"))
        .header("x-user-id", "bench-user")
        .send()
        .await
    {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Polls every router until each answers `want`; returns the time from `t0` to the
/// last router's first `want` answer.
async fn until_all(
    client: &reqwest::Client,
    routers: &[&Router],
    want: &str,
    t0: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut worst = Duration::ZERO;
    for r in routers {
        loop {
            if side(client, r.port).await == want {
                worst = worst.max(t0.elapsed());
                break;
            }
            if t0.elapsed() > limit {
                return None;
            }
        }
    }
    Some(worst)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<34} n={:<3} p50 {:>8.1} ms   p99 {:>8.1} ms   max {:>8.1} ms",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
}

fn cli(config: &Path, args: &[&str]) {
    let out = Command::new(strangler_bin())
        .arg("route")
        .arg("--config")
        .arg(config)
        .args(args)
        .env("UNLEASH_ADMIN_TOKEN", unleash::ADMIN_TOKEN)
        .output()
        .expect("run strangler");
    assert!(
        out.status.success(),
        "strangler route {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::main]
async fn main() {
    let unleash = Unleash::start().await.expect("unleash");
    let legacy = upstream("legacy").await;
    let new = upstream("new").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let flags = format!(
        "[flags]\nsource = \"unleash\"\nurl = \"{}\"\n",
        unleash.api_url()
    );
    let routes = format!(
        "[legacy]\nupstream = \"{legacy}\"\n[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"{new}\"\n"
    );
    let r1 = start_router(dir.path(), "r1", &format!("{flags}{routes}"));
    let r2 = start_router(dir.path(), "r2", &format!("{flags}{routes}"));
    let control = dir.path().join("control.toml");
    std::fs::write(
        &control,
        format!(
            "{flags}[control]\nrouters = [\"http://127.0.0.1:{}\", \"http://127.0.0.1:{}\"]\n{routes}",
            r1.admin, r2.admin
        ),
    )
    .expect("write control config");
    let client = reqwest::Client::new();
    // Steady background load on both routers for the whole run.
    let load_until = Instant::now() + Duration::from_secs(600);
    for port in [r1.port, r2.port] {
        for _ in 0..4 {
            let client = client.clone();
            tokio::spawn(async move {
                while Instant::now() < load_until {
                    let _ = side(&client, port).await;
                }
            });
        }
    }
    let routers = [&r1, &r2];
    let limit = Duration::from_secs(15);

    let mut with_override = Vec::new();
    for round in 0..ROUNDS {
        cli(&control, &["promote", "orders", "--yes"]);
        until_all(&client, &routers, "new", Instant::now(), limit)
            .await
            .unwrap_or_else(|| panic!("round {round}: routers never served new"));
        let t0 = Instant::now();
        let (rolled, observed) = tokio::join!(
            tokio::task::spawn_blocking({
                let control = control.clone();
                move || cli(&control, &["rollback", "orders"])
            }),
            until_all(&client, &routers, "legacy", t0, limit)
        );
        rolled.expect("rollback");
        with_override.push(observed.unwrap_or_else(|| panic!("round {round}: never legacy")));
    }

    let mut toggle_only = Vec::new();
    for round in 0..TOGGLE_ROUNDS {
        cli(&control, &["promote", "orders", "--yes"]);
        until_all(&client, &routers, "new", Instant::now(), limit)
            .await
            .unwrap_or_else(|| panic!("round {round}: routers never served new"));
        let t0 = Instant::now();
        unleash
            .set_enabled("strangler.orders", false)
            .await
            .expect("disable");
        toggle_only.push(
            until_all(&client, &routers, "legacy", t0, limit)
                .await
                .unwrap_or_else(|| panic!("round {round}: never legacy")),
        );
    }
    println!("two routers under steady load (8 client loops), Unleash poll interval 1 s\n");
    report("strangler route rollback", with_override);
    report("Unleash toggle off only (poll)", toggle_only);
}
