//! State shared by the proxy, the admin API and the background tasks.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use crate::config::{ConfigError, RouterConfig, Secret};
use crate::flags::FlagEngine;
use crate::metrics::Metrics;
use crate::routing::Snapshot;
use crate::routing::decide::Overrides;
use crate::telemetry::Telemetry;

/// Everything a request, the admin API and reloads share.
#[derive(Debug)]
pub struct RouterState {
    /// The config and its route table, swapped together on reload.
    snapshot: ArcSwap<Snapshot>,
    /// The admin API's bearer token, read once at start-up ([`crate::config::Secrets`]).
    pub admin_token: Option<Secret>,
    /// Per-route admin overrides.
    pub overrides: Overrides,
    /// Flag evaluation.
    pub flags: Arc<FlagEngine>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Tracing.
    pub telemetry: Telemetry,
    /// Where shadow copies run and the client they use.
    pub shadows: crate::shadow::Shadows,
    /// The served certificate when the listener terminates TLS.
    pub tls: Option<Arc<crate::tls::CertStore>>,
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
        let overrides = match &config.admin.overrides_file {
            Some(file) => Overrides::persisted(file.clone()),
            None => Overrides::default(),
        };
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot::build(config, None, &metrics.stats)),
            admin_token: None,
            overrides,
            flags,
            metrics,
            telemetry,
            shadows: crate::shadow::Shadows::new(),
            tls: None,
            shutting_down: AtomicBool::new(false),
        }
    }

    /// The current config and routes; requests in flight keep the one they started with.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The current config.
    pub fn config(&self) -> Arc<RouterConfig> {
        Arc::clone(&self.snapshot.load().config)
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
        // Routes whose settings did not change keep their breaker, windows and shadow
        // results; the swap is one pointer, so a request sees the old or the new, whole.
        let previous = self.snapshot.load_full();
        self.snapshot.store(Arc::new(Snapshot::build(
            next,
            Some(&previous),
            &self.metrics.stats,
        )));
        tracing::info!(routes, "config reloaded from {}", path.display());
        Ok(())
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
