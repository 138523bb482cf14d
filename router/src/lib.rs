//! The strangler router owns everything on the request path: the route table
//! compiled from config, the per-request decision (override > flag > default),
//! upstream selection, shadowing and comparison, fallback, telemetry and the
//! admin API. It is one pingora `ProxyHttp` implementation that calls a module per
//! concern, each testable without a socket.
