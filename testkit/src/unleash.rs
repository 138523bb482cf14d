//! A real Unleash server (`unleash-server@7.5.1` from npm) on its own PostgreSQL.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::error::{Result, TestkitError, client_err, io_err};
use crate::port::{PortLease, free_port};
use crate::postgres::Postgres;
use crate::process::{ServerProcess, find_binary};

const SERVER: &str = "unleash";
/// The version the install script puts in the cache.
pub const VERSION: &str = "7.5.1";
/// Its first start runs a few hundred migrations; allow for a slow, busy machine.
const READY_DEADLINE: Duration = Duration::from_secs(120);
/// Admin token provisioned at start (`INIT_ADMIN_API_TOKENS`): all projects, all environments.
pub const ADMIN_TOKEN: &str = "*:*.strangler-test-admin-token";
/// Client (backend SDK) token for the `development` environment (`INIT_BACKEND_API_TOKENS`).
pub const CLIENT_TOKEN: &str = "default:development.strangler-test-client-token";
/// The environment the client token reads.
pub const ENVIRONMENT: &str = "development";

/// An Unleash server backed by a PostgreSQL of its own, with [`ADMIN_TOKEN`] and
/// [`CLIENT_TOKEN`] provisioned. Stopped and removed on drop.
#[derive(Debug)]
pub struct Unleash {
    process: Option<ServerProcess>,
    port: PortLease,
    node: PathBuf,
    server_js: PathBuf,
    dir: TempDir,
    postgres: Postgres,
    http: reqwest::Client,
}

/// Where the install script puts unleash-server (override with `STRANGLER_UNLEASH_DIR`).
pub fn install_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STRANGLER_UNLEASH_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("STRANGLER_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/strangler")))
        .unwrap_or_else(|| PathBuf::from("/tmp/strangler-cache"));
    cache.join(format!("unleash-{VERSION}"))
}

impl Unleash {
    /// Starts a PostgreSQL for Unleash, then Unleash on it.
    pub async fn start() -> Result<Self> {
        let node = find_binary(&["node"], "sudo apt-get install nodejs (version 20)")?;
        let server_js = install_dir().join("node_modules/unleash-server/dist/server.js");
        if !server_js.is_file() {
            return Err(TestkitError::MissingBinary {
                binary: server_js.display().to_string(),
                install: format!(
                    "scripts/install-deps.sh (npm install unleash-server@{VERSION} into {})",
                    install_dir().display()
                ),
            });
        }
        let postgres = Postgres::start().await?;
        postgres.create_database("unleash").await?;
        let dir = tempfile::Builder::new()
            .prefix("strangler-unleash-")
            .tempdir()
            .map_err(io_err("creating a temp dir"))?;
        let mut unleash = Self {
            process: None,
            port: free_port()?,
            node,
            server_js,
            dir,
            postgres,
            http: reqwest::Client::new(),
        };
        unleash.spawn_server().await?;
        Ok(unleash)
    }

    /// Runs unleash-server on this value's port and database, and waits until it
    /// serves the client API with [`CLIENT_TOKEN`].
    async fn spawn_server(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.node);
        cmd.arg(&self.server_js)
            .current_dir(self.dir.path())
            .env("DATABASE_URL", self.postgres.url("unleash"))
            .env("DATABASE_SSL", "false")
            .env("HTTP_HOST", "127.0.0.1")
            .env("HTTP_PORT", self.port.port().to_string())
            .env("INIT_ADMIN_API_TOKENS", ADMIN_TOKEN)
            .env("INIT_BACKEND_API_TOKENS", CLIENT_TOKEN)
            .env("INIT_CLIENT_API_TOKENS", CLIENT_TOKEN)
            .env("CHECK_VERSION", "false")
            .env("SEND_TELEMETRY", "false")
            .env("LOG_LEVEL", "warn")
            .env("TZ", "UTC");
        let log_path = self.dir.path().join("unleash.log");
        let mut process = ServerProcess::spawn(SERVER, cmd, &log_path, Signal::SIGTERM)?;
        let base = self.url();
        let http = self.http.clone();
        // Ready means the client API answers with our token, not only that /health is up:
        // tokens are inserted after the HTTP server starts.
        process
            .wait_ready(READY_DEADLINE, || {
                let request = http
                    .get(format!("{base}/api/client/features"))
                    .header("Authorization", CLIENT_TOKEN)
                    .timeout(Duration::from_secs(2))
                    .send();
                async move { matches!(request.await, Ok(r) if r.status().is_success()) }
            })
            .await?;
        self.process = Some(process);
        Ok(())
    }

    /// Kills the server at once (SIGKILL), as a crash would; its database and its
    /// toggles stay, and [`Unleash::restart`] brings it back.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts the server again on the same port and database (stopping it first
    /// if it runs), and waits until it serves the client API.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn_server().await
    }

    /// The server's base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port.port())
    }

    /// The client API URL an SDK is configured with (`…/api/`).
    pub fn api_url(&self) -> String {
        format!("{}/api/", self.url())
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.url()))
            .header("Authorization", ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(client_err(SERVER, format!("{method} {path}")))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(client_err(SERVER, format!("reading {method} {path}")))?;
        if !status.is_success() {
            return Err(TestkitError::Client {
                server: SERVER,
                context: format!("{method} {path} returned {status}: {text}"),
                source: "admin API error".into(),
            });
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates a release toggle in the default project.
    pub async fn create_toggle(&self, name: &str) -> Result<()> {
        self.admin(
            reqwest::Method::POST,
            "/api/admin/projects/default/features",
            Some(json!({ "name": name, "type": "release" })),
        )
        .await
        .map(drop)
    }

    /// Adds a flexibleRollout strategy at `percent` % (default stickiness) in [`ENVIRONMENT`],
    /// and returns the strategy id.
    pub async fn add_rollout(&self, name: &str, percent: u8) -> Result<String> {
        let created = self
            .admin(
                reqwest::Method::POST,
                &format!(
                    "/api/admin/projects/default/features/{name}/environments/{ENVIRONMENT}/strategies"
                ),
                Some(rollout_strategy(name, percent)),
            )
            .await?;
        Ok(created
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string())
    }

    /// Changes an existing strategy's rollout percentage.
    pub async fn set_rollout(&self, name: &str, strategy_id: &str, percent: u8) -> Result<()> {
        self.admin(
            reqwest::Method::PUT,
            &format!(
                "/api/admin/projects/default/features/{name}/environments/{ENVIRONMENT}/strategies/{strategy_id}"
            ),
            Some(rollout_strategy(name, percent)),
        )
        .await
        .map(drop)
    }

    /// Turns the toggle on or off in [`ENVIRONMENT`].
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        let state = if enabled { "on" } else { "off" };
        self.admin(
            reqwest::Method::POST,
            &format!(
                "/api/admin/projects/default/features/{name}/environments/{ENVIRONMENT}/{state}"
            ),
            None,
        )
        .await
        .map(drop)
    }

    /// What an SDK with [`CLIENT_TOKEN`] reads: the client-features document.
    pub async fn client_features(&self) -> Result<Value> {
        let response = self
            .http
            .get(format!("{}/api/client/features", self.url()))
            .header("Authorization", CLIENT_TOKEN)
            .send()
            .await
            .map_err(client_err(SERVER, "GET /api/client/features"))?;
        response
            .json()
            .await
            .map_err(client_err(SERVER, "decoding /api/client/features"))
    }

    /// Stops the server (its PostgreSQL stops when this value drops).
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
    }
}

fn rollout_strategy(name: &str, percent: u8) -> Value {
    json!({
        "name": "flexibleRollout",
        "constraints": [],
        "parameters": {
            "rollout": percent.to_string(),
            "stickiness": "default",
            "groupId": name,
        }
    })
}

impl Drop for Unleash {
    fn drop(&mut self) {
        self.stop();
    }
}
