//! Headers on the way through: which are hop-by-hop (one list, also used for
//! shadow copies), who the client is behind trusted proxies, the forwarding
//! headers added upstream, and the request limits checked on arrival.

use pingora::http::RequestHeader;
use pingora::prelude::*;

/// Hop-by-hop headers (RFC 9110 §7.6.1) and proxy credentials meant for this hop:
/// never forwarded as they came, to either upstream or to a shadow copy.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Of [`HOP_BY_HOP`], what pingora's HTTP/1 framing manages on the proxied request
/// itself: it keeps `Upgrade`/`Connection: upgrade` for WebSockets and frames the
/// body (`Transfer-Encoding`) on its own.
const FRAMED_BY_PINGORA: &[&str] = &["connection", "upgrade", "transfer-encoding"];

/// Header names the client lists in `Connection` (hop-by-hop by declaration),
/// lowercased, without the connection options pingora interprets.
fn named_in_connection(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "upgrade" && t != "keep-alive" && t != "close")
        .collect()
}

/// Whether a request header is forwarded on a shadow copy: not hop-by-hop, not
/// named in `Connection`, and not one the copy's own client sets (length, trace).
pub fn forwarded_on_copy(name: &str, named: &[String]) -> bool {
    !HOP_BY_HOP.contains(&name)
        && !matches!(name, "content-length" | "traceparent" | "tracestate")
        && !named.iter().any(|n| n == name)
}

/// The headers of a request worth forwarding on a shadow copy.
pub fn copy_headers(headers: &http::HeaderMap) -> Vec<(String, String)> {
    let named = named_in_connection(headers);
    headers
        .iter()
        .filter(|(k, _)| forwarded_on_copy(k.as_str(), &named))
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

/// Removes hop-by-hop headers from the proxied request, and any the client names
/// in `Connection`. `Upgrade`/`Connection: upgrade` stay for WebSockets.
pub fn strip_hop_by_hop(request: &mut RequestHeader) {
    for name in named_in_connection(&request.headers) {
        request.remove_header(name.as_str());
    }
    for name in HOP_BY_HOP {
        if !FRAMED_BY_PINGORA.contains(name) {
            request.remove_header(*name);
        }
    }
}

/// `Via` as this hop writes it.
const VIA: &str = "1.1 strangler";

/// Adds `X-Forwarded-For/-Proto/-Host`, `Host` when the client sent only
/// `:authority`, and `Via`. `X-Forwarded-For` is appended to only when it came from
/// a trusted proxy; from anyone else it is replaced, so clients cannot forge it.
pub fn add_forwarding(
    upstream_request: &mut RequestHeader,
    client_request: &RequestHeader,
    peer: Option<std::net::IpAddr>,
    peer_trusted: bool,
    scheme: &'static str,
) -> Result<()> {
    if let Some(peer) = peer {
        let peer = peer.to_string();
        let prior = upstream_request
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .filter(|_| peer_trusted)
            .map(str::to_string);
        let forwarded = match prior {
            Some(prior) => format!("{prior}, {peer}"),
            None => peer,
        };
        upstream_request.insert_header("x-forwarded-for", forwarded)?;
    }
    upstream_request.insert_header("x-forwarded-proto", scheme)?;
    let host = client_request
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| client_request.uri.authority().map(|a| a.to_string()));
    if let Some(host) = host {
        upstream_request.insert_header("x-forwarded-host", host.as_str())?;
        if upstream_request.headers.get(http::header::HOST).is_none() {
            // HTTP/2 clients send :authority; HTTP/1.1 upstreams need Host.
            upstream_request.insert_header(http::header::HOST, host.as_str())?;
        }
    }
    let via = match upstream_request
        .headers
        .get(http::header::VIA)
        .and_then(|v| v.to_str().ok())
    {
        Some(prior) => format!("{prior}, {VIA}"),
        None => VIA.to_string(),
    };
    upstream_request.insert_header(http::header::VIA, via)?;
    Ok(())
}

/// The client's address behind trusted proxies: the rightmost X-Forwarded-For entry
/// that is not itself a trusted proxy.
pub fn client_from_forwarded(
    header: Option<&http::HeaderValue>,
    trusted: &[ipnet::IpNet],
) -> Option<std::net::IpAddr> {
    let list = header?.to_str().ok()?;
    let addrs: Vec<std::net::IpAddr> = list
        .split(',')
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    addrs
        .iter()
        .rev()
        .find(|ip| !trusted.iter().any(|n| n.contains(*ip)))
        .or_else(|| addrs.first())
        .copied()
}

/// The first limit a request breaks, as the status to answer and why.
pub fn over_limit(req: &RequestHeader, limits: &crate::config::Limits) -> Option<(u16, String)> {
    let target = req.uri.path_and_query().map_or(0, |p| p.as_str().len());
    if target > limits.max_uri_bytes {
        return Some((
            414,
            format!(
                "request target of {target} bytes exceeds {}",
                limits.max_uri_bytes
            ),
        ));
    }
    if req.headers.len() > limits.max_headers {
        return Some((
            431,
            format!(
                "{} header fields exceed {}",
                req.headers.len(),
                limits.max_headers
            ),
        ));
    }
    let bytes: usize = req
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if bytes > limits.max_header_bytes {
        return Some((
            431,
            format!(
                "{bytes} bytes of headers exceed {}",
                limits.max_header_bytes
            ),
        ));
    }
    let declared = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared
        && n > limits.max_body_bytes
    {
        return Some((
            413,
            format!("a body of {n} bytes exceeds {}", limits.max_body_bytes),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_answer_414_431_and_413() {
        let limits = crate::config::Limits {
            max_uri_bytes: 10,
            max_headers: 2,
            max_header_bytes: 40,
            max_body_bytes: 5,
            header_timeout: std::time::Duration::from_secs(1),
            body_timeout: std::time::Duration::from_secs(1),
            drain: std::time::Duration::from_secs(1),
        };
        let req = |uri: &str, headers: &[(&str, &str)]| {
            let mut r = RequestHeader::build("GET", uri.as_bytes(), None).expect("request");
            for (k, v) in headers {
                r.append_header(k.to_string(), *v).expect("header");
            }
            r
        };
        assert_eq!(over_limit(&req("/ok", &[]), &limits), None);
        assert_eq!(
            over_limit(&req("/0123456789", &[]), &limits).map(|x| x.0),
            Some(414)
        );
        assert_eq!(
            over_limit(&req("/", &[("a", "1"), ("b", "2"), ("c", "3")]), &limits).map(|x| x.0),
            Some(431)
        );
        let long = "x".repeat(50);
        assert_eq!(
            over_limit(&req("/", &[("a", long.as_str())]), &limits).map(|x| x.0),
            Some(431)
        );
        assert_eq!(
            over_limit(&req("/", &[("content-length", "6")]), &limits).map(|x| x.0),
            Some(413)
        );
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_dropped() {
        let mut r = RequestHeader::build("GET", b"/", None).expect("request");
        for (k, v) in [
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
        ] {
            r.append_header(k, v).expect("header");
        }
        strip_hop_by_hop(&mut r);
        assert!(r.headers.get("x-secret").is_none());
        assert!(r.headers.get("te").is_none());
        assert!(
            r.headers.get("upgrade").is_some(),
            "WebSocket upgrades pass"
        );
        assert!(r.headers.get("x-kept").is_some());
    }

    #[test]
    fn a_copy_drops_the_same_hop_by_hop_headers_as_the_proxied_request() {
        let mut headers = http::HeaderMap::new();
        for (k, v) in [
            ("connection", "X-Secret"),
            ("x-secret", "1"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("content-length", "3"),
            ("traceparent", "00-x"),
            ("x-kept", "1"),
        ] {
            headers.append(
                http::HeaderName::from_static(k),
                http::HeaderValue::from_static(v),
            );
        }
        let names: Vec<String> = copy_headers(&headers).into_iter().map(|(k, _)| k).collect();
        assert_eq!(names, vec!["x-kept".to_string()]);
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_forwarded_address() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let header = |v: &str| http::HeaderValue::from_str(v).expect("header");
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().expect("ip"));
        assert_eq!(
            client_from_forwarded(
                Some(&header("198.51.100.1, 203.0.113.9, 10.0.0.2")),
                &trusted
            ),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_from_forwarded(Some(&header("10.0.0.5, 10.0.0.2")), &trusted),
            ip("10.0.0.5")
        );
        assert_eq!(
            client_from_forwarded(Some(&header("garbage, 203.0.113.9")), &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(client_from_forwarded(None, &trusted), None);
    }
}
