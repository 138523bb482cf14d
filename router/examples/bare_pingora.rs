//! The floor for `bench/router.sh`: a pingora proxy with no routing, flags, metrics
//! or spans, configured like the router (single-threaded workers, pooled
//! upstream connections), so the benchmark can say what strangler's own logic costs.
//! Usage: `bare_pingora LISTEN UPSTREAM [THREADS]` (2 by default), e.g.
//! `bare_pingora 127.0.0.1:8081 127.0.0.1:3000 4`.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::{Opt, ServerConf};

struct Bare {
    upstream: std::net::SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8081".into());
    let upstream = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:3000".into())
        .parse()
        .unwrap_or_else(|e| panic!("bad upstream address: {e}"));
    let threads = args
        .next()
        .map_or(Ok(2), |t| t.parse())
        .unwrap_or_else(|e| panic!("bad thread count: {e}"));
    let conf = ServerConf {
        threads,
        work_stealing: false,
        pid_file: "/tmp/strangler-bare-pingora.pid".into(),
        upgrade_sock: "/tmp/strangler-bare-pingora.sock".into(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, Bare { upstream });
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever()
}
