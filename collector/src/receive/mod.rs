//! OTLP receivers: gRPC (4317) and HTTP (4318), traces only.

pub mod grpc;
pub mod http;
