//! `strangler init`: a starting `strangler.toml`, `flags.json` and `collector.toml`
//! for a monolith, commented, that `strangler config check` accepts and `strangler
//! router run` serves as written. Every route starts on legacy (its flag off).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use strangler_model::RouteName;
use strangler_model::names::FLAG_PREFIX;

/// What `strangler init` was asked for.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The monolith: `http://127.0.0.1:3000` or `127.0.0.1:3000`.
    pub legacy: String,
    /// The new service, when there is one yet.
    pub new: Option<String>,
    /// `NAME=PREFIX` routes to the new service.
    pub routes: Vec<String>,
    /// Flags from this Unleash server instead of a `flags.json` file.
    pub unleash: Option<String>,
    /// Where the router listens.
    pub listen: String,
    /// Where its admin API listens.
    pub admin: String,
    /// Where the files go.
    pub dir: PathBuf,
    /// Overwrite files that exist.
    pub force: bool,
}

/// A route asked for on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RouteSpec {
    name: String,
    prefix: String,
}

fn parse_route(text: &str) -> anyhow::Result<RouteSpec> {
    let Some((name, prefix)) = text.split_once('=') else {
        bail!("--route {text:?}: expected NAME=PREFIX, e.g. orders=/api/orders");
    };
    let name = RouteName::new(name.trim())
        .map_err(|e| anyhow::anyhow!("--route {text:?}: {e}"))?
        .to_string();
    let prefix = prefix.trim();
    if !prefix.starts_with('/') {
        bail!("--route {text:?}: the prefix must start with '/'");
    }
    if prefix.contains(['"', '\\', '\n']) {
        bail!("--route {text:?}: the prefix may not contain quotes, backslashes or newlines");
    }
    Ok(RouteSpec {
        name,
        prefix: prefix.to_string(),
    })
}

/// A `host:port` or `http://host:port` that can go in a TOML string as is.
fn address(flag: &str, text: &str) -> anyhow::Result<String> {
    let text = text.trim();
    if text.is_empty() || text.contains(['"', '\\', '\n', ' ']) {
        bail!("{flag} {text:?}: expected host:port or http://host:port");
    }
    Ok(text.to_string())
}

/// The three files' contents: (strangler.toml, flags.json when file flags, collector.toml).
fn render(
    options: &InitOptions,
    routes: &[RouteSpec],
) -> anyhow::Result<(String, Option<String>, String)> {
    let legacy = address("--legacy", &options.legacy)?;
    let new = options
        .new
        .as_deref()
        .map(|n| address("--new", n))
        .transpose()?;
    let listen = address("--listen", &options.listen)?;
    let admin = address("--admin", &options.admin)?;
    let mut toml = String::new();
    let _ = write!(
        toml,
        "# strangler router config, written by `strangler init`. Check it with\n\
         #   strangler config check strangler.toml\n\
         # and run it with\n\
         #   strangler router run --config strangler.toml\n\
         # Every setting is described in docs/router.md.\n\n\
         [server]\n\
         listen = \"{listen}\"      # where clients (or your load balancer) connect\n\
         # threads = 2                 # worker threads; default: one per core\n\n\
         [legacy]\n\
         upstream = \"{legacy}\"    # the monolith: every request goes here unless a route says otherwise\n\n\
         [admin]\n\
         listen = \"{admin}\"       # route control and /metrics; loopback needs no token\n\
         # token_env = \"STRANGLER_ADMIN_TOKEN\"\n\n"
    );
    match &options.unleash {
        Some(url) => {
            let url = address("--unleash", url)?;
            let _ = write!(
                toml,
                "[flags]\n\
                 source = \"unleash\"\n\
                 url = \"{url}\"\n\
                 # token_env = \"UNLEASH_CLIENT_TOKEN\"   # a client (backend) token, read from this variable\n\
                 # poll_interval_ms = 1000\n\n"
            );
        }
        None => toml.push_str(
            "[flags]\n\
             source = \"file\"\n\
             file = \"flags.json\"          # Unleash client-features JSON, re-read when it changes\n\n",
        ),
    }
    toml.push_str(
        "[telemetry]\n\
         # Traces go to the strangler collector (collector.toml); unset to export nothing.\n\
         otlp_endpoint = \"http://127.0.0.1:4317\"\n\
         # The routes' exact request counts and latency histograms, as OTLP metrics:\n\
         # every view counts from these, so spans are examples (sample_ratio 0.01).\n\
         metrics_endpoint = \"http://127.0.0.1:4317\"\n\
         # sample_ratio = 0.01\n\
         service_name = \"strangler-router\"\n\n",
    );
    if routes.is_empty() {
        let new = new.as_deref().unwrap_or("127.0.0.1:4000");
        let _ = write!(
            toml,
            "# Routes move one part of the monolith to the new service. Uncomment and adapt:\n\
             # [[route]]\n\
             # name = \"orders\"                  # names the flag strangler.orders, metrics and spans\n\
             # match = {{ prefix = \"/api/orders\" }}\n\
             # new = \"{new}\"\n\
             # sticky = \"header:x-user-id\"      # a user stays on one side; or cookie:NAME, or ip\n"
        );
    }
    for route in routes {
        let Some(new) = &new else {
            bail!(
                "--route {} needs --new: the address of the new service",
                route.name
            );
        };
        let _ = write!(
            toml,
            "[[route]]\n\
             name = \"{name}\"                 # flag {FLAG_PREFIX}{name}: off = legacy, on = new\n\
             match = {{ prefix = \"{prefix}\" }}\n\
             new = \"{new}\"\n\
             # sticky = \"header:x-user-id\"    # keep each user on one side during a canary\n\
             # health_path = \"/health\"        # probe the new service; failing = legacy\n\n\
             # [route.shadow]                   # compare the new service's answers first:\n\
             # percent = 100                    # `strangler route shadow {name}` does this for you\n\n",
            name = route.name,
            prefix = route.prefix,
        );
    }
    let flags = options.unleash.is_none().then(|| {
        let features: Vec<serde_json::Value> = routes
            .iter()
            .map(|r| {
                let flag = format!("{FLAG_PREFIX}{}", r.name);
                serde_json::json!({
                    "name": flag,
                    "enabled": false,
                    "strategies": [{
                        "name": "flexibleRollout",
                        "parameters": {"rollout": "0", "stickiness": "default", "groupId": flag}
                    }]
                })
            })
            .collect();
        let doc = serde_json::json!({"version": 2, "features": features});
        serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
    });
    let collector = "# strangler collector config, written by `strangler init`. Run it with\n\
         #   strangler collector run --config collector.toml\n\
         # It stores the router's traces in ClickHouse and serves the old-vs-new\n\
         # dashboard on web_listen. Every setting is described in docs/collector.md.\n\n\
         grpc_listen = \"127.0.0.1:4317\"     # OTLP/gRPC (the router exports here)\n\
         http_listen = \"127.0.0.1:4318\"     # OTLP/HTTP\n\
         web_listen = \"127.0.0.1:8686\"      # dashboard, JSON API, /metrics; off loopback it needs a token\n\
         clickhouse_url = \"http://127.0.0.1:8123\"\n\
         database = \"strangler\"\n\
         # user = \"default\"\n\
         # password_env = \"CLICKHOUSE_PASSWORD\"\n\
         spool_dir = \"strangler-spool\"      # spans wait here while ClickHouse is down\n"
        .to_string();
    Ok((toml, flags, collector))
}

/// Writes the files into `options.dir`; refuses to overwrite any without `force`.
pub fn run(options: &InitOptions) -> anyhow::Result<ExitCode> {
    let routes = options
        .routes
        .iter()
        .map(|r| parse_route(r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut seen = std::collections::HashSet::new();
    for r in &routes {
        if !seen.insert(&r.name) {
            bail!("--route {} is given twice", r.name);
        }
    }
    let (toml, flags, collector) = render(options, &routes)?;
    let mut files: Vec<(PathBuf, String)> = vec![(options.dir.join("strangler.toml"), toml)];
    if let Some(flags) = flags {
        files.push((options.dir.join("flags.json"), flags));
    }
    files.push((options.dir.join("collector.toml"), collector));
    let existing: Vec<String> = files
        .iter()
        .filter(|(p, _)| p.exists())
        .map(|(p, _)| p.display().to_string())
        .collect();
    if !existing.is_empty() && !options.force {
        bail!(
            "{} already exist{}; nothing written (--force overwrites)",
            existing.join(", "),
            if existing.len() == 1 { "s" } else { "" }
        );
    }
    std::fs::create_dir_all(&options.dir)
        .with_context(|| format!("creating {}", options.dir.display()))?;
    for (path, text) in &files {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", display(path));
    }
    println!("\nnext:");
    println!("  strangler config check strangler.toml");
    println!("  strangler router run --config strangler.toml");
    println!("  strangler collector run --config collector.toml   # needs ClickHouse");
    if let Some(first) = routes.first() {
        println!(
            "  strangler route shadow {}   # compare the new service's answers",
            first.name
        );
    }
    if options.unleash.is_some() {
        println!(
            "\nCreate one toggle per route in Unleash, named {FLAG_PREFIX}<route>, off to start; set UNLEASH_CLIENT_TOKEN for the router."
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn display(path: &Path) -> String {
    path.strip_prefix(".").unwrap_or(path).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(routes: &[&str], new: Option<&str>) -> InitOptions {
        InitOptions {
            legacy: "http://127.0.0.1:3000".into(),
            new: new.map(str::to_string),
            routes: routes.iter().map(|r| r.to_string()).collect(),
            unleash: None,
            listen: "127.0.0.1:8080".into(),
            admin: "127.0.0.1:9080".into(),
            dir: PathBuf::from("."),
            force: false,
        }
    }

    #[test]
    fn the_written_config_parses_as_the_router_reads_it() {
        let o = options(
            &["orders=/api/orders", "users=/api/users"],
            Some("127.0.0.1:4000"),
        );
        let routes: Vec<RouteSpec> = o
            .routes
            .iter()
            .map(|r| parse_route(r).expect("route"))
            .collect();
        let (toml, flags, collector) = render(&o, &routes).expect("render");
        let config = strangler_router::RouterConfig::parse(&toml, Path::new("strangler.toml"))
            .expect("valid router config");
        assert_eq!(config.routes.len(), 2);
        let flags: serde_json::Value =
            serde_json::from_str(&flags.expect("file flags")).expect("json");
        assert_eq!(flags["features"][0]["name"], "strangler.orders");
        assert_eq!(flags["features"][0]["enabled"], false);
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("collector.toml");
        std::fs::write(&path, collector).expect("write");
        strangler_collector::CollectorConfig::load(Some(&path)).expect("valid collector config");
    }

    #[test]
    fn bad_routes_and_a_route_without_a_new_service_are_refused() {
        assert!(parse_route("orders").is_err());
        assert!(parse_route("orders=api").is_err());
        assert!(parse_route("Bad Name=/x").is_err());
        let o = options(&["orders=/api/orders"], None);
        let routes = vec![parse_route("orders=/api/orders").expect("route")];
        let err = render(&o, &routes).expect_err("needs --new").to_string();
        assert!(err.contains("--new"), "{err}");
    }
}
