//! The strangler router owns everything on the request path: the route table
//! compiled from config, the per-request decision (override > flag > default),
//! upstream selection, telemetry and the admin API. It is one pingora `ProxyHttp`
//! implementation ([`proxy::StranglerProxy`]) that calls a module per concern, each
//! testable without a socket.

pub mod admin;
pub mod breaker;
pub mod compare;
pub mod config;
pub mod decide;
pub mod flags;
pub mod guard;
pub mod metrics;
pub mod plan;
pub mod proxy;
pub mod route;
pub mod server;
pub mod shadow;
pub mod state;
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
