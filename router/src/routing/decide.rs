//! The per-request decision: admin override > flag > default (legacy).

use std::collections::HashMap;

use arc_swap::ArcSwap;
use http::HeaderMap;

pub use strangler_model::{Backend, Reason};

use crate::config::{RouteConfig, Stickiness};
use crate::flags::{FlagEngine, context_for};

/// A decision with what the span records about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The side.
    pub backend: Backend,
    /// Why.
    pub reason: Reason,
    /// The variant the flag gave, if any.
    pub variant: Option<String>,
}

impl Decision {
    /// Legacy, for `reason`.
    pub fn legacy(reason: Reason) -> Self {
        Self {
            backend: Backend::Legacy,
            reason,
            variant: None,
        }
    }
}

/// Per-route admin overrides; read on every request without locking.
#[derive(Debug, Default)]
pub struct Overrides {
    map: ArcSwap<HashMap<String, Backend>>,
}

impl Overrides {
    /// The override for a route.
    pub fn get(&self, route: &str) -> Option<Backend> {
        let map = self.map.load();
        // The usual case: no override anywhere, nothing to hash.
        if map.is_empty() {
            return None;
        }
        map.get(route).copied()
    }

    /// Sets (`Some`) or clears (`None`) a route's override.
    pub fn set(&self, route: &str, backend: Option<Backend>) {
        self.map.rcu(|current| {
            let mut next = HashMap::clone(current);
            match backend {
                Some(b) => next.insert(route.to_string(), b),
                None => next.remove(route),
            };
            next
        });
    }
}

/// Reads the stickiness key of a request.
pub fn sticky_key<'a>(
    sticky: &Stickiness,
    headers: &'a HeaderMap,
    client_ip: Option<&'a str>,
) -> Option<std::borrow::Cow<'a, str>> {
    match sticky {
        Stickiness::Header(name) => headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(std::borrow::Cow::Borrowed),
        Stickiness::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| std::borrow::Cow::Borrowed(v.trim_matches('"')))
            .filter(|v| !v.is_empty()),
        Stickiness::ClientIp => client_ip.map(std::borrow::Cow::Borrowed),
    }
}

/// Decides the side for a request that matched `route`.
pub fn decide(
    route: &RouteConfig,
    overrides: &Overrides,
    flags: &FlagEngine,
    headers: &HeaderMap,
    client_ip: Option<&str>,
) -> Decision {
    if let Some(backend) = overrides.get(route.name.as_str()) {
        return Decision {
            backend,
            reason: Reason::Override,
            variant: None,
        };
    }
    let key = sticky_key(&route.sticky, headers, client_ip);
    let context = context_for(&route.sticky, key.as_deref());
    let flag = flags.evaluate(&route.flag, &context);
    if !flag.known {
        return Decision {
            backend: Backend::Legacy,
            reason: Reason::Default,
            variant: None,
        };
    }
    Decision {
        backend: if flag.enabled {
            Backend::New
        } else {
            Backend::Legacy
        },
        reason: Reason::Flag,
        variant: flag.variant,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::RouterConfig;
    use crate::flags::parse_features;

    fn route(sticky: &str) -> RouteConfig {
        let text = format!(
            "[legacy]\nupstream = \"127.0.0.1:1\"\n[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"127.0.0.1:2\"\nsticky = \"{sticky}\"\n"
        );
        RouterConfig::parse(&text, Path::new("t.toml"))
            .expect("valid")
            .routes
            .remove(0)
    }

    fn engine(enabled: bool, rollout: u8) -> FlagEngine {
        let e = FlagEngine::new("test").expect("engine");
        let doc = serde_json::json!({"version": 2, "features": [{"name": "strangler.orders", "enabled": enabled,
            "strategies": [{"name": "flexibleRollout", "parameters": {"rollout": rollout.to_string(), "stickiness": "default", "groupId": "strangler.orders"}}]}]});
        e.apply(parse_features(doc.to_string().as_bytes(), "t").expect("doc"))
            .expect("apply");
        e
    }

    #[test]
    fn override_beats_flag_and_clearing_it_restores_the_flag() {
        let r = route("header:x-user-id");
        let overrides = Overrides::default();
        let flags = engine(true, 100);
        let headers = HeaderMap::new();
        assert_eq!(
            decide(&r, &overrides, &flags, &headers, None).backend,
            Backend::New
        );
        overrides.set("orders", Some(Backend::Legacy));
        let d = decide(&r, &overrides, &flags, &headers, None);
        assert_eq!((d.backend, d.reason), (Backend::Legacy, Reason::Override));
        overrides.set("orders", None);
        assert_eq!(
            decide(&r, &overrides, &flags, &headers, None).reason,
            Reason::Flag
        );
    }

    #[test]
    fn unknown_flag_defaults_to_legacy() {
        let r = route("ip");
        let flags = FlagEngine::new("empty").expect("engine");
        let d = decide(
            &r,
            &Overrides::default(),
            &flags,
            &HeaderMap::new(),
            Some("10.0.0.1"),
        );
        assert_eq!((d.backend, d.reason), (Backend::Legacy, Reason::Default));
    }

    #[test]
    fn sticky_keys_come_from_header_cookie_or_ip() {
        let mut headers = HeaderMap::new();
        headers.insert("x-user-id", "u1".parse().expect("v"));
        headers.insert("cookie", "a=1; session=\"s-9\"; b=2".parse().expect("v"));
        let key = |s: &str| {
            sticky_key(&route(s).sticky, &headers, Some("10.1.2.3")).map(|k| k.into_owned())
        };
        assert_eq!(key("header:x-user-id").as_deref(), Some("u1"));
        assert_eq!(key("cookie:session").as_deref(), Some("s-9"));
        assert_eq!(key("cookie:missing"), None);
        assert_eq!(key("ip").as_deref(), Some("10.1.2.3"));
    }

    #[test]
    fn the_same_cookie_always_lands_on_the_same_side() {
        let r = route("cookie:sid");
        let flags = engine(true, 50);
        let overrides = Overrides::default();
        let mut new = 0;
        for i in 0..400 {
            let mut headers = HeaderMap::new();
            headers.insert("cookie", format!("sid=s{i}").parse().expect("v"));
            let first = decide(&r, &overrides, &flags, &headers, None).backend;
            for _ in 0..3 {
                assert_eq!(
                    decide(&r, &overrides, &flags, &headers, None).backend,
                    first
                );
            }
            new += usize::from(first == Backend::New);
        }
        assert!(
            (140..=260).contains(&new),
            "about half of 400 sessions, got {new}"
        );
    }
}
