//! The old-vs-new comparison views: every panel's SQL lives here once, as named
//! queries with parameters, and both the collector's web page and the Grafana
//! dashboard JSON are built from it.
