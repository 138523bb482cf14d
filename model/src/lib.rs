//! What more than one strangler crate must agree on, defined once: route names,
//! backends and decision reasons, the route lifecycle and its history (one typed
//! reader and writer), the names of spans, events and attributes on the wire,
//! rollout plans, the `[control]` settings, and the config error with its
//! `FILE:LINE:COLUMN`.
//!
//! Few dependencies: the router, the collector, CDC and the CLI all link it
//! (tokio-postgres only for the shared route history).

pub mod config_error;
pub mod control;
pub mod history;
pub mod hosts;
pub mod lifecycle;
pub mod names;
pub mod rollout;
pub mod route;

pub use config_error::{ConfigError, Invalid, line_col};
pub use history::{Entry, History, HistoryError, Lease, LeaseError, Location};
pub use lifecycle::{Percent, State};
pub use route::{Backend, Reason, RouteName};
