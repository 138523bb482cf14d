//! The old-vs-new comparison views: every panel's SQL lives here once, as named
//! queries with parameters, and both the collector's web page and the Grafana
//! dashboard JSON are built from it.
//!
//! The queries are written in the Grafana ClickHouse plugin's (v4) dialect —
//! `$__timeFilter(column)`, `$__interval_s`, `'${route}'` — so Grafana runs them as
//! they are, and [`query::expand`] gives the collector the same text with the macros
//! replaced and the variables bound (never pasted) as values.

pub mod grafana;
pub mod query;
pub mod web;

pub use query::{ExpandError, Expanded, NamedQuery, Params, QUERIES, Shape};
