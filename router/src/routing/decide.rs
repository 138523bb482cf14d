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
    /// The route pins sessions and this answer must (re)set the pin to this side.
    pub set_pin: Option<Backend>,
}

impl Decision {
    /// Legacy, for `reason`.
    pub fn legacy(reason: Reason) -> Self {
        Self {
            backend: Backend::Legacy,
            reason,
            variant: None,
            set_pin: None,
        }
    }
}

/// The header a trusted tester picks a side with.
pub const FORCE_HEADER: &str = "x-strangler-force";

/// The side a request from a trusted tester asks for with [`FORCE_HEADER`]: only
/// when the client's address is in `testers`.
pub fn forced_side(
    testers: &[ipnet::IpNet],
    headers: &HeaderMap,
    client_ip: Option<&str>,
) -> Option<Backend> {
    if testers.is_empty() {
        return None;
    }
    let side = match headers.get(FORCE_HEADER)?.to_str().ok()?.trim() {
        "new" => Backend::New,
        "legacy" => Backend::Legacy,
        _ => return None,
    };
    let ip: std::net::IpAddr = client_ip?.parse().ok()?;
    testers.iter().any(|n| n.contains(&ip)).then_some(side)
}

/// The value of cookie `name` in a request (quotes trimmed), if present.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// The side a request's pin cookie names, if it names one.
pub fn pinned_side(headers: &HeaderMap, name: &str) -> Option<Backend> {
    match cookie(headers, name)? {
        "new" => Some(Backend::New),
        "legacy" => Some(Backend::Legacy),
        _ => None,
    }
}

/// Per-route admin overrides; read on every request without locking.
///
/// Each route's override has a version that changes with every set or clear, so a
/// caller can clear it only if nobody changed it since it looked
/// ([`Overrides::clear_if`]): a forward move must not undo a rollback that landed
/// meanwhile. Versions carry a per-process nonce, so one read from a router that
/// restarted since never matches.
///
/// With a file ([`Overrides::persisted`]), every change is written to it (atomically:
/// a temporary file, fsync, rename) and a restarted router starts from it, so a
/// rollback pushed to the routers while the flag store was down survives a restart
/// of the router instead of giving way to the stale flags.
#[derive(Debug)]
pub struct Overrides {
    map: ArcSwap<HashMap<String, Backend>>,
    /// Changes per route; the lock also orders writers (the request path never takes it).
    changes: std::sync::Mutex<HashMap<String, u64>>,
    nonce: u64,
    file: Option<std::path::PathBuf>,
}

impl Default for Overrides {
    fn default() -> Self {
        Self {
            map: ArcSwap::default(),
            changes: std::sync::Mutex::default(),
            nonce: rand::random(),
            file: None,
        }
    }
}

impl Overrides {
    /// Overrides kept in `file`: those it holds now apply at once. A file that
    /// cannot be read or parsed is reported and ignored (the router starts with
    /// none, and rewrites it at the next change).
    pub fn persisted(file: std::path::PathBuf) -> Self {
        let kept: HashMap<String, Backend> = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(
                    "{} holds no overrides this router can read ({e}); starting with none",
                    file.display()
                );
                HashMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => {
                tracing::error!(
                    "cannot read the overrides kept in {} ({e}); starting with none",
                    file.display()
                );
                HashMap::new()
            }
        };
        for (route, backend) in &kept {
            tracing::warn!(
                route = route.as_str(),
                backend = backend.as_str(),
                "override kept from before the restart ({})",
                file.display()
            );
        }
        Self {
            map: ArcSwap::from_pointee(kept),
            file: Some(file),
            ..Self::default()
        }
    }

    /// Writes the overrides to the file, if there is one; a failure is logged (the
    /// override applies in this process regardless).
    fn save(&self) {
        let Some(file) = &self.file else {
            return;
        };
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let bytes = serde_json::to_vec_pretty(&**self.map.load())?;
            let tmp = file.with_extension("json.tmp");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, file)
        };
        if let Err(e) = write() {
            tracing::error!(
                "cannot keep the overrides in {} ({e}): a restart of this router would forget them",
                file.display()
            );
        }
    }

    /// The override for a route.
    pub fn get(&self, route: &str) -> Option<Backend> {
        let map = self.map.load();
        // The usual case: no override anywhere, nothing to hash.
        if map.is_empty() {
            return None;
        }
        map.get(route).copied()
    }

    /// The version of a route's override (changes with every set and clear).
    pub fn version(&self, route: &str) -> String {
        let changes = self
            .changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.version_of(&changes, route)
    }

    fn version_of(&self, changes: &HashMap<String, u64>, route: &str) -> String {
        format!(
            "{:016x}.{}",
            self.nonce,
            changes.get(route).copied().unwrap_or(0)
        )
    }

    /// Sets (`Some`) or clears (`None`) a route's override.
    pub fn set(&self, route: &str, backend: Option<Backend>) {
        let mut changes = self
            .changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.write(&mut changes, route, backend);
    }

    /// Clears a route's override if its version is still `version`; else returns
    /// the current version and changes nothing.
    pub fn clear_if(&self, route: &str, version: &str) -> Result<(), String> {
        let mut changes = self
            .changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.version_of(&changes, route);
        if current != version {
            return Err(current);
        }
        self.write(&mut changes, route, None);
        Ok(())
    }

    fn write(&self, changes: &mut HashMap<String, u64>, route: &str, backend: Option<Backend>) {
        *changes.entry(route.to_string()).or_default() += 1;
        self.map.rcu(|current| {
            let mut next = HashMap::clone(current);
            match backend {
                Some(b) => next.insert(route.to_string(), b),
                None => next.remove(route),
            };
            next
        });
        // Under the lock, so the file's order of writes is the overrides' order.
        self.save();
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
        Stickiness::Cookie(name) => cookie(headers, name)
            .filter(|v| !v.is_empty())
            .map(std::borrow::Cow::Borrowed),
        Stickiness::ClientIp => client_ip.map(std::borrow::Cow::Borrowed),
    }
}

/// Decides the side for a request that matched `route`: admin override >
/// trusted tester's forced side (`forced`) > session pin > flag > default.
pub fn decide(
    route: &RouteConfig,
    overrides: &Overrides,
    flags: &FlagEngine,
    headers: &HeaderMap,
    client_ip: Option<&str>,
) -> Decision {
    decide_forced(route, overrides, flags, headers, client_ip, None)
}

/// [`decide`] with a trusted tester's forced side ([`forced_side`]).
pub fn decide_forced(
    route: &RouteConfig,
    overrides: &Overrides,
    flags: &FlagEngine,
    headers: &HeaderMap,
    client_ip: Option<&str>,
    forced: Option<Backend>,
) -> Decision {
    if let Some(backend) = overrides.get(route.name.as_str()) {
        // An override (a rollback, a forced side) moves pinned sessions too, and
        // re-pins them to where it sent them.
        let set_pin = route
            .pin
            .as_ref()
            .filter(|p| pinned_side(headers, &p.cookie) != Some(backend))
            .map(|_| backend);
        return Decision {
            backend,
            reason: Reason::Override,
            variant: None,
            set_pin,
        };
    }
    if let Some(backend) = forced {
        // A tester's choice for this request only: no pin is set or changed.
        return Decision {
            backend,
            reason: Reason::Override,
            variant: None,
            set_pin: None,
        };
    }
    let pinned = route
        .pin
        .as_ref()
        .and_then(|p| pinned_side(headers, &p.cookie));
    // A pinned session keeps its side while the percentage moves, as long as the
    // toggle is on; a toggle switched off (or gone) sends everyone to legacy.
    if let Some(side) = pinned
        && flags.state(&route.flag).enabled
    {
        return Decision {
            backend: side,
            reason: Reason::Flag,
            variant: None,
            set_pin: None,
        };
    }
    let key = sticky_key(&route.sticky, headers, client_ip);
    let context = context_for(&route.sticky, key.as_deref());
    let flag = flags.evaluate(&route.flag, &context);
    let (backend, reason, variant) = if !flag.known {
        (Backend::Legacy, Reason::Default, None)
    } else if flag.enabled {
        (Backend::New, Reason::Flag, flag.variant)
    } else {
        (Backend::Legacy, Reason::Flag, flag.variant)
    };
    Decision {
        backend,
        reason,
        variant,
        set_pin: route
            .pin
            .as_ref()
            .filter(|_| pinned != Some(backend))
            .map(|_| backend),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn overrides_kept_in_a_file_apply_again_after_a_restart_and_a_bad_file_means_none() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("router.overrides.json");
        let first = Overrides::persisted(file.clone());
        first.set("orders", Some(Backend::Legacy));
        first.set("cart", Some(Backend::New));
        first.set("cart", None);
        // The restarted process.
        let again = Overrides::persisted(file.clone());
        assert_eq!(again.get("orders"), Some(Backend::Legacy));
        assert_eq!(again.get("cart"), None);
        std::fs::write(&file, b"{not json").expect("write");
        assert_eq!(Overrides::persisted(file).get("orders"), None);
    }

    #[test]
    fn an_override_is_cleared_only_by_whoever_saw_its_current_version() {
        let overrides = Overrides::default();
        let seen = overrides.version("orders");
        // A rollback lands after the forward move looked.
        overrides.set("orders", Some(Backend::Legacy));
        assert!(overrides.clear_if("orders", &seen).is_err());
        assert_eq!(overrides.get("orders"), Some(Backend::Legacy));
        // Who saw the rollback's version may clear it.
        let now = overrides.version("orders");
        assert!(overrides.clear_if("orders", &now).is_ok());
        assert_eq!(overrides.get("orders"), None);
        // Another process's versions never match.
        assert!(Overrides::default().clear_if("orders", &now).is_err());
    }
    use crate::config::RouterConfig;
    use crate::flags::parse_features;

    fn route(sticky: &str) -> RouteConfig {
        route_with(sticky, "")
    }

    fn route_with(sticky: &str, extra: &str) -> RouteConfig {
        let text = format!(
            "[legacy]\nupstream = \"127.0.0.1:1\"\n[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"127.0.0.1:2\"\nsticky = \"{sticky}\"\n{extra}"
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

    #[test]
    fn a_pinned_session_keeps_its_side_while_the_percentage_moves_but_not_past_a_rollback() {
        let r = route_with("header:x-user-id", "pin = \"cookie\"\n");
        let overrides = Overrides::default();
        let at = |enabled: bool, rollout: u8| engine(enabled, rollout);
        // A first request: decided by the flag, and pinned there.
        let mut headers = HeaderMap::new();
        headers.insert("x-user-id", "u1".parse().expect("v"));
        let first = decide(&r, &overrides, &at(true, 100), &headers, None);
        assert_eq!(
            (first.backend, first.set_pin),
            (Backend::New, Some(Backend::New))
        );
        // With its pin, the session stays on new at 0 % and is not re-pinned.
        headers.insert(
            "cookie",
            "a=1; strangler_pin_orders=new".parse().expect("v"),
        );
        let d = decide(&r, &overrides, &at(true, 0), &headers, None);
        assert_eq!(
            (d.backend, d.reason, d.set_pin),
            (Backend::New, Reason::Flag, None)
        );
        // A session pinned to legacy stays there at 100 %.
        headers.insert("cookie", "strangler_pin_orders=legacy".parse().expect("v"));
        assert_eq!(
            decide(&r, &overrides, &at(true, 100), &headers, None).backend,
            Backend::Legacy
        );
        // A rollback (override) moves it, and re-pins it.
        headers.insert("cookie", "strangler_pin_orders=new".parse().expect("v"));
        overrides.set("orders", Some(Backend::Legacy));
        let d = decide(&r, &overrides, &at(true, 100), &headers, None);
        assert_eq!(
            (d.backend, d.reason, d.set_pin),
            (Backend::Legacy, Reason::Override, Some(Backend::Legacy))
        );
        overrides.set("orders", None);
        // So does a toggle switched off.
        let d = decide(&r, &overrides, &at(false, 100), &headers, None);
        assert_eq!(
            (d.backend, d.set_pin),
            (Backend::Legacy, Some(Backend::Legacy))
        );
        // A cookie naming no side is no pin.
        headers.insert("cookie", "strangler_pin_orders=both".parse().expect("v"));
        let d = decide(&r, &overrides, &at(true, 100), &headers, None);
        assert_eq!((d.backend, d.set_pin), (Backend::New, Some(Backend::New)));
        // Without `pin`, nothing is ever pinned.
        let plain = route("header:x-user-id");
        assert_eq!(
            decide(&plain, &overrides, &at(true, 100), &headers, None).set_pin,
            None
        );
    }

    #[test]
    fn only_trusted_testers_pick_a_side_and_a_rollback_still_wins() {
        let r = route("header:x-user-id");
        let testers: Vec<ipnet::IpNet> = vec!["10.1.0.0/16".parse().expect("net")];
        let mut headers = HeaderMap::new();
        headers.insert(FORCE_HEADER, "new".parse().expect("v"));
        assert_eq!(
            forced_side(&testers, &headers, Some("10.1.2.3")),
            Some(Backend::New)
        );
        assert_eq!(
            forced_side(&testers, &headers, Some("10.2.0.1")),
            None,
            "not a tester"
        );
        assert_eq!(
            forced_side(&[], &headers, Some("10.1.2.3")),
            None,
            "no testers configured"
        );
        assert_eq!(forced_side(&testers, &headers, None), None);
        headers.insert(FORCE_HEADER, "both".parse().expect("v"));
        assert_eq!(forced_side(&testers, &headers, Some("10.1.2.3")), None);
        // New at 0 % for the tester; a rollback's override still wins.
        let overrides = Overrides::default();
        let flags = engine(true, 0);
        let d = decide_forced(
            &r,
            &overrides,
            &flags,
            &HeaderMap::new(),
            None,
            Some(Backend::New),
        );
        assert_eq!((d.backend, d.reason), (Backend::New, Reason::Override));
        overrides.set("orders", Some(Backend::Legacy));
        let d = decide_forced(
            &r,
            &overrides,
            &flags,
            &HeaderMap::new(),
            None,
            Some(Backend::New),
        );
        assert_eq!(d.backend, Backend::Legacy);
    }
}
