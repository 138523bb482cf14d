//! Running the router: pingora server, proxy and admin services, and background tasks
//! (flag source, config reload on file change or SIGHUP).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{BackgroundService, background_service};
use pingora::services::listening::Service;

use crate::admin::AdminApi;
use crate::config::{ConfigError, FlagsConfig, RouterConfig};
use crate::flags::{FileFlagSource, FlagEngine, FlagError, FlagSource, UnleashFlagSource, drive};
use crate::metrics::Metrics;
use crate::proxy::StranglerProxy;
use crate::state::RouterState;
use crate::telemetry::{Telemetry, TelemetryError};

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The flag engine could not be set up.
    #[error(transparent)]
    Flags(#[from] FlagError),
    /// Telemetry could not be set up.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A listen address is taken or not ours.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn check_bindable(addr: std::net::SocketAddr) -> Result<(), StartError> {
    // pingora panics deep inside on a bind failure; probe first for a clear message.
    std::net::TcpListener::bind(addr)
        .map(drop)
        .map_err(|source| StartError::Listen { addr, source })
}

/// How the router process starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Take over the listening sockets of a running router with the same listen
    /// address (graceful binary upgrade): start this one with `upgrade`, then send the
    /// old one SIGQUIT; it hands its sockets over and finishes its in-flight requests.
    pub upgrade: bool,
}

/// Where a router listening on `listen` exchanges its sockets during an upgrade.
pub fn upgrade_socket(listen: std::net::SocketAddr) -> PathBuf {
    PathBuf::from(format!("/tmp/strangler-router-{}.sock", listen.port()))
}

/// Builds the router from a config file and runs it until SIGTERM/SIGINT (or SIGQUIT,
/// which hands the sockets to an upgrading router). Does not return on success
/// (pingora exits the process after a graceful shutdown).
pub fn run(config_path: &Path, options: RunOptions) -> Result<(), StartError> {
    let config = RouterConfig::load(config_path)?;
    // Credentials are read once, here; a reload does not re-read them.
    let secrets = crate::config::Secrets::read(&config)?;
    if !options.upgrade {
        check_bindable(config.listen)?;
        check_bindable(config.admin.listen)?;
    }
    let metrics = Metrics::new();
    let telemetry = Telemetry::new(&config.telemetry, &metrics)?;
    let metrics_exporter = match &config.telemetry.metrics_endpoint {
        // Routes' aggregates as OTLP metrics (deltas); reloads keep the same counters.
        Some(endpoint) => {
            let exporter = Arc::new(
                crate::stats::export::Exporter::new(
                    Arc::clone(&metrics.stats),
                    endpoint.clone(),
                    config.telemetry.service_name.clone(),
                )
                .map_err(crate::telemetry::TelemetryError::Thread)?,
            );
            crate::stats::export::spawn(Arc::clone(&exporter), config.telemetry.metrics_interval)
                .map_err(crate::telemetry::TelemetryError::Thread)?;
            Some(exporter)
        }
        None => None,
    };
    let source: Arc<dyn FlagSource> = match &config.flags {
        FlagsConfig::File { path } => Arc::new(FileFlagSource::new(path)),
        FlagsConfig::Unleash {
            url,
            token_env,
            interval,
            app_name,
        } => {
            let Some(token) = &secrets.unleash_token else {
                return Err(StartError::Config(ConfigError::Invalid {
                    path: config_path.to_path_buf(),
                    message: format!(
                        "flags.source = \"unleash\" needs a client token in the env var {token_env}"
                    ),
                }));
            };
            Arc::new(UnleashFlagSource::new(
                url,
                token.expose(),
                app_name,
                *interval,
            )?)
        }
    };
    let flags = Arc::new(FlagEngine::new(source.describe())?);
    let listen = config.listen;
    let admin_listen = config.admin.listen;
    let threads = config.threads;
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(crate::tls::CertStore::load(files)?)),
        None => None,
    };
    let mut state = RouterState::new(config, Arc::clone(&flags), metrics, telemetry);
    state.admin_token = secrets.admin_token;
    state.tls = tls;
    let state = Arc::new(state);

    let header_timeout = state.config().limits.header_timeout;
    let conf = ServerConf {
        threads,
        // One single-threaded runtime per worker, like nginx workers: no cross-thread
        // wake-ups on the request path (measured in bench/router.sh).
        work_stealing: false,
        // Each router gets its own pid file and upgrade socket so several can share a host.
        pid_file: format!("/tmp/strangler-router-{}.pid", listen.port()),
        upgrade_sock: upgrade_socket(listen).to_string_lossy().into_owned(),
        // On SIGQUIT/SIGTERM keep accepting for a moment, so a load balancer (or the
        // upgrading process) has taken over before the listener closes, then let
        // in-flight requests finish.
        grace_period_seconds: Some(GRACE_PERIOD.as_secs()),
        graceful_shutdown_timeout_seconds: Some(10),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: options.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let mut http = pingora::proxy::http_proxy(
        &server.configuration,
        StranglerProxy::new(Arc::clone(&state)),
    );
    let mut http_options = pingora::apps::HttpServerOptions::default();
    http_options.h2c = true;
    http.server_options = Some(http_options);
    let mut proxy = Service::new(
        "strangler-router".to_string(),
        crate::guard::GuardedApp::new(
            http,
            header_timeout,
            state.metrics.slow_clients.clone(),
            state.config().limits.drain,
        ),
    );
    match &state.tls {
        Some(store) => proxy.add_tls_with_settings(
            &listen.to_string(),
            None,
            crate::tls::listener_settings(Arc::clone(store))?,
        ),
        None => proxy.add_tcp(&listen.to_string()),
    }
    server.add_service(proxy);

    let mut admin = Service::new(
        "strangler-admin".to_string(),
        AdminApi::new(Arc::clone(&state)),
    );
    admin.add_tcp(&admin_listen.to_string());
    server.add_service(admin);

    server.add_service(background_service(
        "strangler-background",
        Background {
            state: Arc::clone(&state),
            source,
            config_path: config_path.to_path_buf(),
            metrics_exporter,
        },
    ));
    tracing::info!(%listen, admin = %admin_listen, "strangler router starting");
    server.run_forever()
}

struct Background {
    state: Arc<RouterState>,
    source: Arc<dyn FlagSource>,
    config_path: PathBuf,
    /// Sends the last counts at shutdown, once in-flight requests had the drain to finish.
    metrics_exporter: Option<Arc<crate::stats::export::Exporter>>,
}

/// After SIGTERM/SIGQUIT the listeners keep accepting this long (pingora's grace
/// period); background work must be done by its end.
const GRACE_PERIOD: Duration = Duration::from_secs(1);

#[async_trait]
impl BackgroundService for Background {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let flags = tokio::spawn(drive(
            Arc::clone(&self.source),
            Arc::clone(&self.state.flags),
        ));
        let reload = tokio::spawn(watch_config(
            Arc::clone(&self.state),
            self.config_path.clone(),
        ));
        let health = tokio::spawn(health_checks(Arc::clone(&self.state)));
        let _ = shutdown.changed().await;
        self.state.begin_shutdown();
        flags.abort();
        reload.abort();
        health.abort();
        let state = Arc::clone(&self.state);
        // The SDK flush blocks; keep it off the runtime.
        let _ = tokio::task::spawn_blocking(move || state.telemetry.flush()).await;
        if let Some(exporter) = self.metrics_exporter.clone() {
            // pingora ends this runtime when the grace period is over: export the last
            // counts just before, so requests answered meanwhile are in them too.
            tokio::time::sleep(GRACE_PERIOD.saturating_sub(Duration::from_millis(250))).await;
            let _ = tokio::task::spawn_blocking(move || exporter.export_once()).await;
        }
    }
}

/// Checks each route's new service on its health path and drives the route's breaker:
/// `threshold` failed checks in a row mark it down (no traffic, no probes), as many
/// passing checks mark it up again.
async fn health_checks(state: Arc<RouterState>) {
    #[derive(Default)]
    struct Health {
        next: Option<std::time::Instant>,
        failures: u32,
        successes: u32,
        down: bool,
    }
    let client = reqwest::Client::new();
    let mut health: std::collections::HashMap<String, Health> = std::collections::HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let snapshot = state.snapshot();
        for runtime in snapshot.table.routes() {
            let route = &runtime.config;
            let breaker = &runtime.state.breaker;
            let Some(check) = &route.health else { continue };
            let h = health.entry(route.name.to_string()).or_default();
            let now = std::time::Instant::now();
            if h.next.is_some_and(|t| now < t) {
                continue;
            }
            h.next = Some(now + check.interval);
            let url = format!("http://{}{}", route.new_upstream.addr, check.path);
            let ok = client
                .get(&url)
                .timeout(check.interval.min(Duration::from_secs(2)))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                h.failures = 0;
                h.successes += 1;
            } else {
                h.successes = 0;
                h.failures += 1;
            }
            if !h.down && h.failures >= check.threshold {
                h.down = true;
                breaker.set_health(false);
                tracing::warn!(route = %route.name, %url, "health check failing: the new service is bypassed");
            } else if h.down && breaker.state() == crate::routing::breaker::BreakerState::Closed {
                // A reload changed the route and gave it a fresh breaker: still down.
                breaker.set_health(false);
            } else if h.down && h.successes >= check.threshold {
                h.down = false;
                breaker.set_health(true);
                tracing::info!(route = %route.name, %url, "health check passing again: traffic returns to the new service");
            }
        }
    }
}

/// Reloads on SIGHUP and when the config file changes.
async fn watch_config(state: Arc<RouterState>, path: PathBuf) {
    let changed = Arc::new(tokio::sync::Notify::new());
    let notify_on = Arc::clone(&changed);
    // The config file, and the certificate and key when TLS is on: a renewed
    // certificate is picked up like a config change.
    let mut watched = vec![path.clone()];
    if let Some(store) = &state.tls {
        let files = store.files();
        watched.extend([files.cert, files.key]);
    }
    let names: Vec<_> = watched
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
        .collect();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && event.kind.is_modify() | event.kind.is_create()
            && event.paths.iter().any(|p| {
                p.file_name()
                    .is_some_and(|n| names.iter().any(|w| w.as_os_str() == n))
            })
        {
            notify_on.notify_one();
        }
    });
    let _watcher = match watcher {
        Ok(mut w) => {
            use notify::Watcher;
            let mut dirs: Vec<&Path> = watched
                .iter()
                .map(|p| {
                    p.parent()
                        .filter(|d| !d.as_os_str().is_empty())
                        .unwrap_or(Path::new("."))
                })
                .collect();
            dirs.sort();
            dirs.dedup();
            for dir in dirs {
                if let Err(e) = w.watch(dir, notify::RecursiveMode::NonRecursive) {
                    tracing::warn!(
                        "cannot watch {} for config changes: {e}; reload with SIGHUP",
                        dir.display()
                    );
                }
            }
            Some(w)
        }
        Err(e) => {
            tracing::warn!("no file watcher ({e}); reload with SIGHUP");
            None
        }
    };
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP: {e}");
            None
        }
    };
    loop {
        tokio::select! {
            _ = changed.notified() => {}
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading config");
            }
        }
        // Let an editor finish writing before reading.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Err(e) = state.reload(&path) {
            tracing::error!(
                "config reload rejected, keeping the running config: {}",
                crate::flags::error_chain(&e)
            );
        }
    }
}
