//! Helpers for tests that run the real `strangler` binary against real servers.

#![allow(dead_code)]

pub mod known;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use strangler_testkit::{PortLease, free_port};

/// An HTTP upstream that answers every request with JSON describing it:
/// `{"side": NAME, "method", "path", "query", "headers": {...}, "body"}`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a scripted upstream answers.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    pub delay: Duration,
}

pub type Handler = Arc<dyn Fn(&hyper::http::request::Parts) -> Reply + Send + Sync>;

impl Upstream {
    /// An upstream answering with `handler`; counts requests and those marked as shadow copies.
    pub async fn start_with(handler: Handler) -> (Self, Arc<AtomicU64>) {
        Self::start_with_at(handler, "127.0.0.1:0".parse().expect("addr")).await
    }

    /// Like [`Upstream::start_with`] on a given address (to restart a killed upstream on
    /// its port). Dropping the upstream closes its listener and every open connection.
    pub async fn start_with_at(handler: Handler, at: SocketAddr) -> (Self, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind(at)
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicU64::new(0));
        let shadow_hits = Arc::new(AtomicU64::new(0));
        let (counter, shadows) = (Arc::clone(&hits), Arc::clone(&shadow_hits));
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the accept task drops them all.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (counter, shadows, handler) = (
                    Arc::clone(&counter),
                    Arc::clone(&shadows),
                    Arc::clone(&handler),
                );
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (counter, shadows, handler) = (
                            Arc::clone(&counter),
                            Arc::clone(&shadows),
                            Arc::clone(&handler),
                        );
                        async move {
                            counter.fetch_add(1, Ordering::Relaxed);
                            let (parts, body) = req.into_parts();
                            let _ = body.collect().await;
                            if parts.headers.contains_key("x-strangler-shadow") {
                                shadows.fetch_add(1, Ordering::Relaxed);
                            }
                            let reply = handler(&parts);
                            if !reply.delay.is_zero() {
                                tokio::time::sleep(reply.delay).await;
                            }
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(reply.status)
                                    .header("content-type", reply.content_type)
                                    .body(Full::new(Bytes::from(reply.body)))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (Self { addr, hits, task }, shadow_hits)
    }

    pub async fn start(side: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&hits);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let counter = Arc::clone(&counter);
                        async move {
                            counter.fetch_add(1, Ordering::Relaxed);
                            Ok::<_, Infallible>(describe(side, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, hits, task }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

async fn describe(side: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if parts.uri.path() == "/slow" {
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    if parts.uri.path() == "/fail" {
        return Response::builder()
            .status(503)
            .body(Full::new(Bytes::from_static(b"down")))
            .expect("response");
    }
    let headers: serde_json::Map<String, Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                Value::String(v.to_str().unwrap_or("").to_string()),
            )
        })
        .collect();
    let doc = json!({
        "side": side,
        "method": parts.method.to_string(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(doc.to_string())))
        .expect("response")
}

/// A running `strangler router run`, killed on drop.
pub struct Router {
    child: Child,
    pub port: PortLease,
    pub admin_port: PortLease,
    /// Where the admin API listens (`127.0.0.1:<admin_port>` unless chosen).
    pub admin_addr: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub token: String,
    env: Vec<(String, String)>,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn strangler_bin() -> &'static str {
    env!("CARGO_BIN_EXE_strangler")
}

impl Router {
    /// Writes `strangler.toml` (the `[server]` and `[admin]` sections are added here),
    /// plus any extra files, and starts the router; returns once `/health` answers.
    pub async fn start(body: &str, files: &[(&str, &str)], env: &[(&str, &str)]) -> Self {
        Self::start_server("", body, files, env).await
    }

    /// Like [`Router::start`] with extra lines in the `[server]` section.
    pub async fn start_server(
        server_extra: &str,
        body: &str,
        files: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> Self {
        Self::launch(server_extra, body, files, env, None).await
    }

    /// Like [`Router::start`] with the admin API at `admin_addr` (e.g. one of several
    /// loopback addresses sharing a port, as routers behind one DNS name do).
    pub async fn start_admin_at(
        admin_addr: &str,
        body: &str,
        files: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> Self {
        Self::launch("", body, files, env, Some(admin_addr.to_string())).await
    }

    async fn launch(
        server_extra: &str,
        body: &str,
        files: &[(&str, &str)],
        env: &[(&str, &str)],
        admin_addr: Option<String>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port().expect("port");
        let admin_port = free_port().expect("port");
        let admin_addr = admin_addr.unwrap_or_else(|| format!("127.0.0.1:{}", admin_port.port()));
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).expect("write file");
        }
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\nthreads = 2\n{server_extra}\n\n[admin]\nlisten = \"{admin_addr}\"\n\n{body}",
            port.port(),
        );
        let config_path = dir.path().join("strangler.toml");
        std::fs::write(&config_path, config).expect("write config");
        let token = "test-admin-token".to_string();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = Self::spawn(dir.path(), &config_path, &token, &env);
        let mut router = Self {
            child,
            port,
            admin_port,
            admin_addr,
            dir,
            config_path,
            token,
            env,
        };
        router.wait_healthy().await;
        router
    }

    fn spawn(dir: &Path, config_path: &Path, token: &str, env: &[(String, String)]) -> Child {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("router.log"))
            .expect("log");
        let mut cmd = Command::new(strangler_bin());
        cmd.args(["router", "run", "--config"])
            .arg(config_path)
            .env("STRANGLER_ADMIN_TOKEN", token)
            .env("STRANGLER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn strangler")
    }

    /// SIGKILLs the router and starts it again on the same config, directory and
    /// ports; returns once it is healthy.
    pub async fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.dir.path(), &self.config_path, &self.token, &self.env);
        self.wait_healthy().await;
    }

    async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = reqwest::Client::new();
        loop {
            if let Ok(r) = client.get(self.admin_url("/health")).send().await
                && r.status().is_success()
            {
                // Give the flag source its first read (tests of a failing source
                // never get ready and go on after this grace).
                let ready_by = Instant::now() + Duration::from_secs(5);
                while Instant::now() < ready_by {
                    if let Ok(r) = client.get(self.admin_url("/ready")).send().await
                        && r.status().is_success()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // The admin port can answer a moment before the proxy listener accepts.
                while Instant::now() < ready_by
                    && tokio::net::TcpStream::connect(("127.0.0.1", self.port.port()))
                        .await
                        .is_err()
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("router exited ({status}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "router not healthy; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("router.log")).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port.port())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// The admin API's `/metrics` text (with the admin token).
    pub async fn metrics(&self) -> String {
        reqwest::Client::new()
            .get(self.admin_url("/metrics"))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// `GET /api/orders/{u}` as `user-{u}` for u in 0..n, each answered 200;
    /// `after(u)` runs after request u.
    pub async fn get_orders_as_users<F, Fut>(&self, n: usize, mut after: F)
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let client = reqwest::Client::new();
        for u in 0..n {
            let r = client
                .get(self.url(&format!("/api/orders/{u}")))
                .header("x-user-id", format!("user-{u}"))
                .send()
                .await
                .expect("request");
            assert_eq!(r.status().as_u16(), 200);
            after(u).await;
        }
    }

    /// Starts a second router process on the same config with `--upgrade` (it waits
    /// for this one's sockets), logging to `upgrade.log`.
    pub fn spawn_upgrade(&self) -> Child {
        let log = std::fs::File::create(self.dir.path().join("upgrade.log")).expect("log");
        Command::new(strangler_bin())
            .args(["router", "run", "--upgrade", "--config"])
            .arg(&self.config_path)
            .env("STRANGLER_ADMIN_TOKEN", &self.token)
            .env("STRANGLER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn upgrading strangler")
    }

    /// Waits for the router process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let client = reqwest::Client::new();
        let mut req = client
            .request(method, self.admin_url(path))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.expect("admin request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("admin body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

/// GETs `path` as `user` and returns the side that answered.
pub async fn side_for(client: &reqwest::Client, router: &Router, path: &str, user: &str) -> String {
    let r = client
        .get(router.url(path))
        .header("x-user-id", user)
        .send()
        .await
        .expect("request through router");
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    body["side"]
        .as_str()
        .unwrap_or_else(|| {
            panic!(
                "no side in response ({status}): {body}; log:\n{}",
                router.log()
            )
        })
        .to_string()
}

/// Polls `check` until it holds or `timeout` passes; returns how long it took.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client-features document with one toggle.
pub fn flags_doc(name: &str, enabled: bool, rollout: u8) -> String {
    json!({
        "version": 2,
        "features": [{
            "name": name,
            "type": "release",
            "enabled": enabled,
            "strategies": [{
                "name": "flexibleRollout",
                "parameters": {"rollout": rollout.to_string(), "stickiness": "default", "groupId": name}
            }]
        }]
    })
    .to_string()
}

/// Atomically replaces a file (write + rename), as a careful tool would.
pub fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

pub fn route_config(legacy: SocketAddr, new: SocketAddr, flags: &str) -> String {
    format!(
        "{flags}\n[legacy]\nupstream = \"{legacy}\"\n\n[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"{new}\"\nsticky = \"header:x-user-id\"\n"
    )
}

/// Steady GET load from `workers` keep-alive clients until `stop`; returns (sent, answered, errors).
pub fn load(
    url: String,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(u64, u64, Vec<String>)>> {
    load_paced(url, workers, stop, None)
}

/// Like [`load`], each worker sending at most one request per `pace`.
pub fn load_paced(
    url: String,
    workers: usize,
    stop: Arc<AtomicBool>,
    pace: Option<Duration>,
) -> Vec<tokio::task::JoinHandle<(u64, u64, Vec<String>)>> {
    (0..workers)
        .map(|worker| {
            let (stop, url) = (Arc::clone(&stop), url.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let (mut sent, mut ok, mut errors) = (0u64, 0u64, Vec::new());
                let mut tick = pace.map(tokio::time::interval);
                while !stop.load(Ordering::Relaxed) {
                    if let Some(t) = tick.as_mut() {
                        t.tick().await;
                    }
                    sent += 1;
                    match client
                        .get(&url)
                        .header("x-user-id", format!("w{worker}-{sent}"))
                        .send()
                        .await
                    {
                        Ok(r) if r.status().is_success() => ok += 1,
                        Ok(r) => errors.push(format!("status {}", r.status())),
                        Err(e) => errors.push(format!("{e:?}")),
                    }
                }
                (sent, ok, errors)
            })
        })
        .collect()
}

pub async fn totals(
    loaders: Vec<tokio::task::JoinHandle<(u64, u64, Vec<String>)>>,
) -> (u64, u64, Vec<String>) {
    let (mut sent, mut ok, mut errors) = (0, 0, Vec::new());
    for l in loaders {
        let (s, o, e) = l.await.expect("loader");
        sent += s;
        ok += o;
        errors.extend(e);
    }
    (sent, ok, errors)
}

/// A `strangler collector run` process on free ports, killed on drop.
pub struct Collector {
    pub child: Option<Child>,
    pub grpc: PortLease,
    pub http: PortLease,
    pub web: PortLease,
    pub config: std::path::PathBuf,
    pub dir: tempfile::TempDir,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Collector {
    pub async fn start(clickhouse: &str, extra: &str) -> Self {
        Self::start_in(tempfile::tempdir().expect("tempdir"), clickhouse, extra).await
    }

    /// Like [`Collector::start`] in a directory that may already hold files the config names.
    pub async fn start_in(dir: tempfile::TempDir, clickhouse: &str, extra: &str) -> Self {
        let (grpc, http, web) = (
            free_port().expect("port"),
            free_port().expect("port"),
            free_port().expect("port"),
        );
        let config = dir.path().join("collector.toml");
        std::fs::write(
            &config,
            format!(
                "grpc_listen = \"127.0.0.1:{}\"\nhttp_listen = \"127.0.0.1:{}\"\nweb_listen = \"127.0.0.1:{}\"\nclickhouse_url = \"{clickhouse}\"\nbatch_timeout_ms = 200\n{extra}",
                grpc.port(),
                http.port(),
                web.port()
            ),
        )
        .expect("write config");
        let mut c = Self {
            child: None,
            grpc,
            http,
            web,
            config,
            dir,
        };
        c.spawn().await;
        c
    }

    pub async fn spawn(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("collector.log"))
            .expect("log");
        self.child = Some(
            Command::new(strangler_bin())
                .args(["collector", "run", "--config"])
                .arg(&self.config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn collector"),
        );
        let client = reqwest::Client::new();
        let url = self.web_url("/health");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "collector never healthy:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the collector says it is ready: ClickHouse answers and every
    /// migration has run, so an export acknowledged from now on is in the table.
    pub async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        let url = self.web_url("/ready");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !client
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(
                Instant::now() < deadline,
                "collector never ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("collector.log")).unwrap_or_default()
    }

    pub fn web_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.web.port())
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc.port())
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http.port())
    }

    pub async fn metric(&self, name: &str) -> u64 {
        let text = reqwest::get(self.web_url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }
}

/// A ClickHouse client for test queries (18.16 sends no column types to validate).
pub fn ch_client(ch: &strangler_testkit::ClickHouse) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(ch.http_url())
        .with_validation(false)
}
