//! `[control]`: how the CLI operates routes (which routers, which Unleash, where the
//! history is kept, where rollouts read evidence). The router parses it with its
//! config file, because operators keep both in one file, and otherwise ignores it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config_error::Invalid;
use crate::history::Location;

/// Where rollouts read evidence unless `control.collector_url` says otherwise.
pub const DEFAULT_COLLECTOR_URL: &str = "http://127.0.0.1:8686";
/// Env var holding the Unleash admin token the CLI uses, unless `control.unleash_admin_token_env` names another.
pub const DEFAULT_UNLEASH_ADMIN_TOKEN_ENV: &str = "UNLEASH_ADMIN_TOKEN";
/// A rollback waits this long for every router to confirm: long enough for a busy
/// router, short enough that an operator learns quickly which one did not answer.
pub const DEFAULT_CONTROL_TIMEOUT_MS: u64 = 2_000;
/// The history file next to the config unless `control.history` names another
/// store (a file, or a `postgres://` database shared by a fleet).
pub const DEFAULT_HISTORY_FILE: &str = "strangler.history.jsonl";

/// A `dns://NAME:PORT` router entry's name and port (`None` when it is not one or
/// is malformed). Each address the name resolves to when a command runs is a
/// router, its admin API at `http://ADDRESS:PORT`.
pub fn dns_target(entry: &str) -> Option<(&str, u16)> {
    let rest = entry.strip_prefix("dns://")?.trim_end_matches('/');
    let (name, port) = rest.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    (!name.is_empty() && !name.contains('/') && port > 0).then_some((name, port))
}

/// The route-control settings used by `strangler route …`.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlConfig {
    /// Admin API base URLs of every router (default: this config's own admin
    /// address), or `dns://NAME:PORT` for every address a name resolves to.
    pub routers: Vec<String>,
    /// Unleash base URL for its admin API (default: `flags.url` without `/api/`).
    pub unleash_admin_url: Option<String>,
    /// Env var holding the Unleash admin token.
    pub unleash_admin_token_env: String,
    /// Unleash project holding the toggles.
    pub project: String,
    /// Unleash environment the routers' client token reads.
    pub environment: String,
    /// Where the route history is kept: a JSON-lines file, or a PostgreSQL
    /// database every operator, controller and CDC process shares.
    pub history: Location,
    /// How long a command waits for each router and Unleash.
    pub timeout: Duration,
    /// The collector's web address, where rollouts read their evidence.
    pub collector_url: String,
}

/// `[control]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawControl {
    routers: Option<Vec<String>>,
    unleash_admin_url: Option<String>,
    unleash_admin_token_env: Option<String>,
    project: Option<String>,
    environment: Option<String>,
    history: Option<String>,
    history_file: Option<PathBuf>,
    timeout_ms: Option<u64>,
    collector_url: Option<String>,
}

impl RawControl {
    /// Validates the section. `admin_url` is the router's own admin address (the
    /// default router list), `unleash_client_url` the flag source's client API URL
    /// when flags come from Unleash, `base` the config file's directory.
    pub fn build(
        self,
        admin_url: &str,
        unleash_client_url: Option<&str>,
        base: &Path,
    ) -> Result<ControlConfig, Invalid> {
        let routers: Vec<String> = match self.routers {
            Some(list) if list.is_empty() => {
                return Err("control.routers must list at least one admin URL".into());
            }
            Some(list) => list
                .iter()
                .map(|u| u.trim_end_matches('/').to_string())
                .collect(),
            None => vec![admin_url.to_string()],
        };
        if let Some(url) = routers.iter().find(|u| {
            !(u.starts_with("http://") || u.starts_with("https://") || u.starts_with("dns://"))
        }) {
            return Err(Invalid(format!(
                "control.routers: {url:?} must start with http://, https:// or dns:// (a name whose every address is a router)"
            )));
        }
        if let Some(url) = routers
            .iter()
            .find(|u| u.starts_with("dns://") && dns_target(u).is_none())
        {
            return Err(Invalid(format!(
                "control.routers: {url:?} must be dns://NAME:PORT (each address NAME resolves to, at PORT, is a router's admin API)"
            )));
        }
        let unleash_admin_url = self.unleash_admin_url.or_else(|| {
            unleash_client_url.map(|url| {
                url.trim_end_matches('/')
                    .trim_end_matches("/api")
                    .to_string()
            })
        });
        Ok(ControlConfig {
            routers,
            unleash_admin_url: unleash_admin_url.map(|u| u.trim_end_matches('/').to_string()),
            unleash_admin_token_env: self
                .unleash_admin_token_env
                .unwrap_or_else(|| DEFAULT_UNLEASH_ADMIN_TOKEN_ENV.into()),
            project: self.project.unwrap_or_else(|| "default".into()),
            environment: self.environment.unwrap_or_else(|| "development".into()),
            history: match (self.history, self.history_file) {
                (Some(_), Some(_)) => {
                    return Err(
                        "control: set history (a file or postgres:// URL) or history_file, not both"
                            .into(),
                    );
                }
                (Some(text), None) => {
                    Location::parse(&text, base).map_err(|e| e.context("control"))?
                }
                (None, Some(path)) => Location::File(base.join(path)),
                (None, None) => Location::File(base.join(DEFAULT_HISTORY_FILE)),
            },
            timeout: Duration::from_millis(self.timeout_ms.unwrap_or(DEFAULT_CONTROL_TIMEOUT_MS)),
            collector_url: self
                .collector_url
                .unwrap_or_else(|| DEFAULT_COLLECTOR_URL.into())
                .trim_end_matches('/')
                .to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawControl {
        toml::from_str(text).expect("toml")
    }

    #[test]
    fn defaults_point_at_this_router_and_derive_the_unleash_admin_url() {
        let c = raw("")
            .build(
                "http://127.0.0.1:9080",
                Some("http://u:4242/api/"),
                Path::new("/etc/s"),
            )
            .expect("valid");
        assert_eq!(c.routers, vec!["http://127.0.0.1:9080".to_string()]);
        assert_eq!(c.unleash_admin_url.as_deref(), Some("http://u:4242"));
        assert_eq!(
            c.history,
            Location::File(Path::new("/etc/s").join(DEFAULT_HISTORY_FILE))
        );
        assert_eq!(c.timeout, Duration::from_millis(DEFAULT_CONTROL_TIMEOUT_MS));
    }

    #[test]
    fn router_lists_must_be_urls_and_not_empty() {
        let b = |t: &str| raw(t).build("http://a:1", None, Path::new("."));
        assert!(b("routers = []").is_err());
        assert_eq!(
            b("routers = [\"dns://strangler-admin.shop.svc:9080\"]")
                .map(|c| c.routers)
                .ok(),
            Some(vec!["dns://strangler-admin.shop.svc:9080".to_string()])
        );
        assert!(b("routers = [\"dns://no-port\"]").is_err());
        assert!(b("routers = [\"dns://:9080\"]").is_err());
        assert_eq!(dns_target("dns://a.b:1/"), Some(("a.b", 1)));
        assert!(b("routers = [\"a:1\"]").is_err());
        assert_eq!(
            b("routers = [\"http://x:1/\"]").map(|c| c.routers).ok(),
            Some(vec!["http://x:1".to_string()])
        );
    }

    #[test]
    fn the_history_is_a_file_or_a_postgres_database() {
        let b = |t: &str| raw(t).build("http://a:1", None, Path::new("/etc/s"));
        assert_eq!(
            b("history = \"postgres://ops:pw@db:5432/strangler\"")
                .map(|c| c.history)
                .ok(),
            Some(Location::Postgres(
                "postgres://ops:pw@db:5432/strangler".into()
            ))
        );
        assert_eq!(
            b("history_file = \"h.jsonl\"").map(|c| c.history).ok(),
            Some(Location::File(PathBuf::from("/etc/s/h.jsonl")))
        );
        assert_eq!(
            b("history = \"/var/lib/strangler/h.jsonl\"")
                .map(|c| c.history)
                .ok(),
            Some(Location::File(PathBuf::from("/var/lib/strangler/h.jsonl")))
        );
        let both = b("history = \"a\"\nhistory_file = \"b\"").expect_err("both");
        assert!(both.0.contains("not both"), "{}", both.0);
        let bad = b("history = \"postgres://ops:pw@db:notaport/x\"").expect_err("bad url");
        assert!(bad.0.contains("not a PostgreSQL URL"), "{}", bad.0);
        assert!(!bad.0.contains("pw"), "{}", bad.0);
        assert!(b("history = \"mysql://db/x\"").is_err());
    }
}
