//! A hosts-format override of name resolution (`STRANGLER_HOSTS_FILE`): names it
//! lists resolve there before the system resolver, for every name strangler looks
//! up itself (router upstreams, `dns://` router entries). A way to pin addresses
//! without editing `/etc/hosts`, and the test suite's resolver.

use std::net::{IpAddr, SocketAddr};

/// Env var naming the hosts-format file (`ADDRESS NAME…` per line, `#` comments).
pub const HOSTS_FILE_ENV: &str = "STRANGLER_HOSTS_FILE";

/// The addresses the override file gives `name` at `port` (empty: not listed, or no
/// file). Read at each call, so a changed file takes effect at the next lookup.
pub fn lookup(name: &str, port: u16) -> Vec<SocketAddr> {
    match std::env::var(HOSTS_FILE_ENV) {
        Ok(path) => std::fs::read_to_string(path)
            .map(|text| parse(&text, name, port))
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// The addresses hosts-format `text` gives `name` (comments and bad lines skipped),
/// sorted, each once.
pub fn parse(text: &str, name: &str, port: u16) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let ip: IpAddr = fields.next()?.parse().ok()?;
            fields
                .any(|n| n.eq_ignore_ascii_case(name))
                .then_some(SocketAddr::new(ip, port))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hosts_file_gives_every_address_of_a_name() {
        let text = "# fleet\n127.0.0.3 routers.test\n127.0.0.2 routers.test other\nbad line\n::1 routers.test # v6\n";
        let got: Vec<String> = parse(text, "ROUTERS.test", 9080)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, vec!["127.0.0.2:9080", "127.0.0.3:9080", "[::1]:9080"]);
        assert!(parse(text, "missing", 1).is_empty());
    }
}
