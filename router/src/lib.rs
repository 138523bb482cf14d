//! The strangler router owns everything on the request path. Read it top to bottom:
//! [`config`] (TOML in, validated config out, secrets read once), [`routing`] (the
//! route table and each route's runtime state, swapped whole on reload, and the
//! decision override > flag > default), [`proxy`] (the pingora `ProxyHttp` phases,
//! each short, delegating to headers, retry/fallback and span modules), [`shadow`]
//! (pairs, copies, comparison, calibration), then [`stats`] (exact per-route aggregates), [`telemetry`], [`metrics`],
//! [`admin`] and [`server`].

pub mod admin;
pub mod config;
pub mod flags;
pub mod guard;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod shadow;
pub mod state;
pub mod stats;
pub mod telemetry;
pub mod tls;

pub use config::{ConfigError, RouterConfig};
pub use server::{RunOptions, StartError, run};

/// Iterations and seed of the property tests that throw random input at the config
/// parser and the matcher: the defaults in CI, more on demand through
/// `STRANGLER_FUZZ_ITERATIONS` and `STRANGLER_FUZZ_SEED`.
#[cfg(test)]
pub(crate) fn fuzz_settings(default_iterations: u64, default_seed: u64) -> (u64, u64) {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    (
        env("STRANGLER_FUZZ_ITERATIONS").unwrap_or(default_iterations),
        env("STRANGLER_FUZZ_SEED").unwrap_or(default_seed),
    )
}
