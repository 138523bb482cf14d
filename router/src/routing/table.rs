//! The route table: compiled matchers, most specific match wins.
//!
//! Order, from most to least specific (ties go to the route written first):
//! 1. more literal path segments (`/api/orders/export` beats `/api/orders/{id}`);
//! 2. an exact pattern (`path = …`) beats a prefix with the same literals;
//! 3. more parameters matched (a `{id}` segment beats a `{*rest}` tail);
//! 4. a route that requires a header beats one that does not;
//! 5. a route that lists methods beats one that takes all.

use std::cmp::Reverse;
use std::sync::Arc;

use http::{HeaderMap, Method};

use super::Route;
use crate::config::{PathMatch, RouteConfig, Segment};

/// A route's specificity; larger sorts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Specificity {
    literals: usize,
    exact: bool,
    params: usize,
    header: bool,
    methods: bool,
}

fn specificity(route: &RouteConfig) -> Specificity {
    let (literals, exact, params) = match &route.path {
        PathMatch::Prefix(p) => (p.split('/').filter(|s| !s.is_empty()).count(), false, 0),
        PathMatch::Pattern(segments) => (
            segments
                .iter()
                .filter(|s| matches!(s, Segment::Literal(_)))
                .count(),
            !segments.iter().any(|s| matches!(s, Segment::Rest(_))),
            segments
                .iter()
                .filter(|s| matches!(s, Segment::Param(_)))
                .count(),
        ),
    };
    Specificity {
        literals,
        exact,
        params,
        header: route.header.is_some(),
        methods: !route.methods.is_empty(),
    }
}

/// Routes compiled for matching, in the order they are tried.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Orders routes by specificity (then file order).
    pub fn new(mut routes: Vec<Arc<Route>>) -> Self {
        routes.sort_by_key(|r| (Reverse(specificity(&r.config)), r.config.index));
        Self { routes }
    }

    /// Routes in match order.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// Finds the route for a request; `None` means legacy serves it.
    pub fn find(&self, method: &Method, path: &str, headers: &HeaderMap) -> Option<&Arc<Route>> {
        self.routes
            .iter()
            .find(|r| route_matches(&r.config, method, path, headers))
    }

    /// A route by name.
    pub fn get(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.config.name.as_str() == name)
    }
}

fn route_matches(route: &RouteConfig, method: &Method, path: &str, headers: &HeaderMap) -> bool {
    if !route.methods.is_empty() && !route.methods.contains(method) {
        return false;
    }
    if let Some((name, value)) = &route.header {
        match headers.get(name.as_str()) {
            None => return false,
            Some(v) => {
                if let Some(want) = value
                    && v.as_bytes() != want.as_bytes()
                {
                    return false;
                }
            }
        }
    }
    path_matches(&route.path, path)
}

/// Whether `path` (without query) matches.
pub fn path_matches(matcher: &PathMatch, path: &str) -> bool {
    match matcher {
        PathMatch::Prefix(prefix) => {
            if prefix.is_empty() {
                return true;
            }
            match path.strip_prefix(prefix.as_str()) {
                Some(rest) => rest.is_empty() || rest.starts_with('/'),
                None => false,
            }
        }
        PathMatch::Pattern(segments) => {
            let mut parts = path.trim_start_matches('/').split('/');
            let trailing_ok = path.ends_with('/');
            for segment in segments {
                match segment {
                    Segment::Rest(_) => return true,
                    Segment::Literal(lit) => {
                        if parts.next() != Some(lit.as_str()) {
                            return false;
                        }
                    }
                    Segment::Param(_) => match parts.next() {
                        Some(p) if !p.is_empty() => {}
                        _ => return false,
                    },
                }
            }
            match parts.next() {
                None => true,
                // A single trailing slash is the same resource.
                Some("") => trailing_ok && parts.next().is_none(),
                Some(_) => false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::RouterConfig;

    fn table(routes: &str) -> RouteTable {
        let text = format!("[legacy]\nupstream = \"127.0.0.1:1\"\n{routes}");
        let config = RouterConfig::parse(&text, Path::new("t.toml")).expect("valid");
        super::super::Snapshot::build(config, None, &crate::stats::Stats::default()).table
    }

    fn find<'a>(t: &'a RouteTable, method: Method, path: &str) -> Option<&'a str> {
        t.find(&method, path, &HeaderMap::new()).map(|r| r.name())
    }

    /// Random paths (odd characters, empty and repeated segments, huge inputs) against
    /// every kind of matcher: never a panic, and a match always agrees with the rules.
    #[test]
    fn random_paths_never_panic_the_matcher() {
        use rand::{Rng, SeedableRng};
        let t = table(
            "[[route]]\nname = \"p\"\nmatch = { prefix = \"/api/orders\" }\nnew = \"127.0.0.1:2\"\n\
             [[route]]\nname = \"q\"\nmatch = { path = \"/api/{id}/items/{*rest}\" }\nnew = \"127.0.0.1:2\"\n\
             [[route]]\nname = \"r\"\nmatch = { path = \"/{a}/{b}\" }\nnew = \"127.0.0.1:2\"\n",
        );
        let pieces = [
            "/", "api", "orders", "items", "", "x", "%2F", "..", "é", "{id}", "//", "?",
        ];
        let (iterations, seed) = crate::fuzz_settings(20_000, 7);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..iterations {
            let n = rng.random_range(0..12);
            let path: String = (0..n)
                .map(|_| pieces[rng.random_range(0..pieces.len())])
                .collect();
            if let Some(r) = t.find(&Method::GET, &path, &HeaderMap::new())
                && r.name() == "p"
            {
                assert!(path.starts_with("/api/orders"), "{path}");
            }
        }
        let long = "/a".repeat(100_000);
        assert!(t.find(&Method::GET, &long, &HeaderMap::new()).is_none());
    }

    #[test]
    fn prefix_matches_whole_segments_only() {
        let t = table(
            "[[route]]\nname = \"orders\"\nmatch = { prefix = \"/api/orders\" }\nnew = \"127.0.0.1:2\"\n",
        );
        assert_eq!(find(&t, Method::GET, "/api/orders"), Some("orders"));
        assert_eq!(find(&t, Method::GET, "/api/orders/17"), Some("orders"));
        assert_eq!(find(&t, Method::GET, "/api/ordersx"), None);
        assert_eq!(find(&t, Method::GET, "/api"), None);
    }

    #[test]
    fn most_specific_route_wins_regardless_of_file_order() {
        let t = table(
            r#"
[[route]]
name = "api"
match = { prefix = "/api" }
new = "127.0.0.1:2"
[[route]]
name = "order"
match = { path = "/api/orders/{id}" }
new = "127.0.0.1:2"
[[route]]
name = "export"
match = { path = "/api/orders/export" }
new = "127.0.0.1:2"
[[route]]
name = "orders"
match = { prefix = "/api/orders" }
new = "127.0.0.1:2"
[[route]]
name = "orders-post"
match = { prefix = "/api/orders", methods = ["POST"] }
new = "127.0.0.1:2"
"#,
        );
        assert_eq!(find(&t, Method::GET, "/api/orders/export"), Some("export"));
        assert_eq!(find(&t, Method::GET, "/api/orders/17"), Some("order"));
        assert_eq!(
            find(&t, Method::GET, "/api/orders/17/items"),
            Some("orders")
        );
        assert_eq!(find(&t, Method::POST, "/api/orders"), Some("orders-post"));
        assert_eq!(find(&t, Method::GET, "/api/orders"), Some("orders"));
        assert_eq!(find(&t, Method::GET, "/api/customers"), Some("api"));
        assert_eq!(find(&t, Method::GET, "/"), None);
    }

    #[test]
    fn equal_specificity_goes_to_the_route_written_first() {
        let t = table(
            "[[route]]\nname = \"a\"\nmatch = { path = \"/x/{id}\" }\nnew = \"127.0.0.1:2\"\n\
             [[route]]\nname = \"b\"\nmatch = { path = \"/x/{key}\" }\nnew = \"127.0.0.1:2\"\n",
        );
        assert_eq!(find(&t, Method::GET, "/x/1"), Some("a"));
    }

    #[test]
    fn header_requirement_is_checked() {
        let t = table(
            "[[route]]\nname = \"beta\"\nmatch = { prefix = \"/\", header = \"X-Beta\", header_value = \"1\" }\nnew = \"127.0.0.1:2\"\n",
        );
        let mut headers = HeaderMap::new();
        assert!(t.find(&Method::GET, "/a", &headers).is_none());
        headers.insert("x-beta", "0".parse().expect("value"));
        assert!(t.find(&Method::GET, "/a", &headers).is_none());
        headers.insert("x-beta", "1".parse().expect("value"));
        assert_eq!(
            t.find(&Method::GET, "/a", &headers).map(|r| r.name()),
            Some("beta")
        );
    }

    #[test]
    fn patterns_match_params_rest_and_one_trailing_slash() {
        let t = table(
            "[[route]]\nname = \"item\"\nmatch = { path = \"/api/orders/{id}\" }\nnew = \"127.0.0.1:2\"\n\
             [[route]]\nname = \"files\"\nmatch = { path = \"/files/{*path}\" }\nnew = \"127.0.0.1:2\"\n",
        );
        assert_eq!(find(&t, Method::GET, "/api/orders/9"), Some("item"));
        assert_eq!(find(&t, Method::GET, "/api/orders/9/"), Some("item"));
        assert_eq!(find(&t, Method::GET, "/api/orders/"), None);
        assert_eq!(find(&t, Method::GET, "/api/orders/9/x"), None);
        assert_eq!(find(&t, Method::GET, "/files/a/b/c"), Some("files"));
    }
}
