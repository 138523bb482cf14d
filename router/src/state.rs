//! State shared by the proxy, the admin API and the background tasks.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use crate::config::{ConfigError, RouterConfig};
use crate::decide::Overrides;
use crate::flags::FlagEngine;
use crate::metrics::{Metrics, RouteWindows};
use crate::route::RouteTable;
use crate::telemetry::Telemetry;

/// Everything a request, the admin API and reloads share.
#[derive(Debug)]
pub struct RouterState {
    config: ArcSwap<RouterConfig>,
    table: ArcSwap<RouteTable>,
    /// Per-route admin overrides.
    pub overrides: Overrides,
    /// Flag evaluation.
    pub flags: Arc<FlagEngine>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Last-minute counts per route and backend.
    pub windows: RouteWindows,
    /// Tracing.
    pub telemetry: Telemetry,
    /// Shadow copies, comparison results and calibration.
    pub shadows: crate::shadow::Shadows,
    /// The served certificate when the listener terminates TLS.
    pub tls: Option<Arc<crate::tls::CertStore>>,
    breakers: std::sync::Mutex<std::collections::HashMap<String, Arc<crate::breaker::Breaker>>>,
    shutting_down: AtomicBool,
}

impl RouterState {
    /// State for a validated config.
    pub fn new(
        config: RouterConfig,
        flags: Arc<FlagEngine>,
        metrics: Metrics,
        telemetry: Telemetry,
    ) -> Self {
        let table = RouteTable::new(&config.routes);
        Self {
            config: ArcSwap::from_pointee(config),
            table: ArcSwap::from_pointee(table),
            overrides: Overrides::default(),
            flags,
            metrics,
            windows: RouteWindows::default(),
            telemetry,
            shadows: crate::shadow::Shadows::new(),
            tls: None,
            breakers: std::sync::Mutex::new(std::collections::HashMap::new()),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// The current config.
    pub fn config(&self) -> Arc<RouterConfig> {
        self.config.load_full()
    }

    /// The current route table; requests in flight keep the one they started with.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Re-reads the config file and swaps the route table and upstreams atomically.
    /// A bad file changes nothing. Listen addresses and the flag source need a restart.
    pub fn reload(&self, path: &Path) -> Result<(), ConfigError> {
        let next = RouterConfig::load(path)?;
        let current = self.config();
        if next.listen != current.listen
            || next.admin.listen != current.admin.listen
            || next.threads != current.threads
        {
            tracing::warn!(
                "listen addresses and threads change only on restart; applying routes and upstreams"
            );
        }
        if format!("{:?}", next.flags) != format!("{:?}", current.flags) {
            tracing::warn!(
                "the flag source changes only on restart; applying routes and upstreams"
            );
        }
        match (&self.tls, &next.tls) {
            (Some(store), Some(files)) => {
                // A broken certificate must not take the routes' changes down with it.
                match store.reload(files) {
                    Ok(()) => {
                        tracing::info!("TLS certificate reloaded from {}", files.cert.display())
                    }
                    Err(e) => tracing::error!("{e}; the previous certificate keeps serving"),
                }
            }
            (None, None) => {}
            _ => tracing::warn!("turning TLS on or off needs a restart"),
        }
        let routes = next.routes.len();
        self.table.store(Arc::new(RouteTable::new(&next.routes)));
        self.config.store(Arc::new(next));
        tracing::info!(routes, "config reloaded from {}", path.display());
        Ok(())
    }

    /// The circuit breaker for a route's new service (a new one when its settings change).
    pub fn breaker(&self, route: &crate::config::RouteConfig) -> Arc<crate::breaker::Breaker> {
        let mut map = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        // Looked up by &str: no allocation on the request path unless created or replaced.
        if let Some(b) = map.get(route.name.as_str())
            && b.settings()
                == (
                    route.breaker_failures,
                    route.breaker_open,
                    route.breaker_rate,
                )
        {
            return Arc::clone(b);
        }
        let b = Arc::new(crate::breaker::Breaker::with_rate(
            route.breaker_failures,
            route.breaker_open,
            route.breaker_rate,
        ));
        map.insert(route.name.to_string(), Arc::clone(&b));
        b
    }

    /// Marks the router as draining: readiness turns false.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Ready to take traffic: flags were read at least once and not shutting down.
    pub fn ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Acquire)
            && self.flags.freshness().last_success_age_ms.is_some()
    }
}
