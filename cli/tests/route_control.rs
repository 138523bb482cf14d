//! `strangler route …` against a real Unleash server and two real routers.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use strangler_testkit::{Unleash, free_port, unleash};
use support::*;

const ROUTES: &str = "[[route]]\nname = \"orders\"\nmatch = { prefix = \"/api/orders\" }\nsticky = \"header:x-user-id\"\n";

fn route_section(new: SocketAddr) -> String {
    format!("{ROUTES}new = \"{new}\"\n")
}

/// A router config body: the legacy upstream and the route to `new`.
fn legacy_and_route(legacy: SocketAddr, new: SocketAddr) -> String {
    format!(
        "[legacy]\nupstream = \"{legacy}\"\n\n{}",
        route_section(new)
    )
}

/// Runs `strangler` with `args` and the admin token in the environment.
fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(strangler_bin());
    cmd.args(args)
        .env("STRANGLER_ADMIN_TOKEN", "test-admin-token")
        .env("STRANGLER_ACTOR", "test-operator")
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run strangler")
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Writes the CLI's own config: the same routes and flag source, and both routers.
fn control_config(
    dir: &Path,
    legacy: SocketAddr,
    new: SocketAddr,
    flags: &str,
    routers: &[&Router],
    extra_routers: &[String],
) -> String {
    let mut urls: Vec<String> = routers
        .iter()
        .map(|r| format!("\"{}\"", r.admin_url("")))
        .collect();
    urls.extend(extra_routers.iter().map(|u| format!("\"{u}\"")));
    let text = format!(
        "{flags}\n[control]\nrouters = [{}]\ntimeout_ms = 1500\n\n[legacy]\nupstream = \"{legacy}\"\n\n{}",
        urls.join(", "),
        route_section(new)
    );
    let path = dir.join("control.toml");
    std::fs::write(&path, text).expect("write control config");
    path.display().to_string()
}

async fn sides_for(router: &Router, users: usize) -> HashMap<String, String> {
    let client = reqwest::Client::new();
    let mut out = HashMap::new();
    for u in 0..users {
        let user = format!("user-{u}");
        out.insert(
            user.clone(),
            side_for(&client, router, "/api/orders", &user).await,
        );
    }
    out
}

fn share_new(sides: &HashMap<String, String>) -> f64 {
    sides.values().filter(|s| *s == "new").count() as f64 / sides.len() as f64
}

async fn wait_share(router: &Router, users: usize, want: impl Fn(f64) -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let share = share_new(&sides_for(router, users).await);
        if want(share) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: share of new stayed {share}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn lifecycle_commands_change_what_both_routers_do_and_are_recorded() {
    let unleash = Unleash::start().await.expect("unleash");
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let flags = format!(
        "[flags]\nsource = \"unleash\"\nurl = \"{}\"\npoll_interval_ms = 200\n",
        unleash.api_url()
    );
    let router_config = format!(
        "{flags}\n[legacy]\nupstream = \"{}\"\n\n{}",
        legacy.addr,
        route_section(new.addr)
    );
    let env = [("UNLEASH_CLIENT_TOKEN", unleash::CLIENT_TOKEN)];
    let r1 = Router::start(&router_config, &[], &env).await;
    let r2 = Router::start(&router_config, &[], &env).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = control_config(dir.path(), legacy.addr, new.addr, &flags, &[&r1, &r2], &[]);
    let admin_env = [("UNLEASH_ADMIN_TOKEN", unleash::ADMIN_TOKEN)];
    let route = |args: &[&str]| {
        let mut all = vec!["route", "--config", config.as_str()];
        all.extend_from_slice(args);
        cli(&all, &admin_env)
    };

    // Skipping shadow needs confirmation; without a terminal that is a refusal.
    let out = route(&["canary", "orders", "30"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(show(&out).contains("--yes"), "{}", show(&out));

    let out = route(&["shadow", "orders", "--reason", "compare first"]);
    assert!(out.status.success(), "{}", show(&out));
    // Unleash publishes admin changes to its client API within about a second.
    wait_until(
        Duration::from_secs(10),
        "the shadow toggle in Unleash",
        || {
            let unleash = &unleash;
            async move {
                let features = unleash.client_features().await.expect("features");
                features["features"]
                    .as_array()
                    .and_then(|f| f.iter().find(|f| f["name"] == "strangler.orders.shadow"))
                    .is_some_and(|t| t["enabled"] == true)
            }
        },
    )
    .await;
    for r in [&r1, &r2] {
        assert_eq!(
            share_new(&sides_for(r, 100).await),
            0.0,
            "shadow keeps users on legacy"
        );
    }
    // ... while the new service receives the copies (the routers poll every 200 ms).
    wait_until(
        Duration::from_secs(10),
        "shadow copies at the new service",
        || {
            let (r1, new) = (&r1, &new);
            async move {
                sides_for(r1, 20).await;
                new.hits() > 0
            }
        },
    )
    .await;

    let out = route(&["canary", "orders", "30"]);
    assert!(out.status.success(), "{}", show(&out));
    for r in [&r1, &r2] {
        wait_share(r, 400, |s| (0.2..=0.4).contains(&s), "canary 30 %").await;
    }
    // Both routers place each user on the same side.
    let (a, b) = (sides_for(&r1, 300).await, sides_for(&r2, 300).await);
    assert_eq!(a, b, "the two routers disagree on some user");

    let out = route(&["promote", "orders"]);
    assert!(out.status.success(), "{}", show(&out));
    for r in [&r1, &r2] {
        wait_share(r, 100, |s| s == 1.0, "promote").await;
    }

    // Rollback: when the command returns, both routers already serve legacy.
    let out = route(&["rollback", "orders", "--reason", "errors on new"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("routers: 2/2 confirmed"),
        "{}",
        show(&out)
    );
    for r in [&r1, &r2] {
        assert_eq!(
            share_new(&sides_for(r, 200).await),
            0.0,
            "rollback is immediate"
        );
    }

    let out = route(&["history", "orders", "--output", "json"]);
    assert!(out.status.success(), "{}", show(&out));
    let history: Vec<Value> = serde_json::from_slice(&out.stdout).expect("history json");
    let steps: Vec<(String, String)> = history
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or("").to_string(),
                e["to"]["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        vec![
            ("shadow".into(), "shadow".into()),
            ("canary 30%".into(), "canary".into()),
            ("promote".into(), "new".into()),
            ("rollback".into(), "legacy".into()),
        ]
    );
    assert_eq!(history[3]["actor"], "test-operator");
    assert_eq!(history[3]["reason"], "errors on new");
    assert_eq!(history[1]["to"]["percent"], 30);

    // Restore entry #2 (canary 30 %): the override is cleared and the rollout comes back.
    let out = route(&["restore", "orders", "--to", "2", "--yes"]);
    assert!(out.status.success(), "{}", show(&out));
    for r in [&r1, &r2] {
        wait_share(r, 400, |s| (0.2..=0.4).contains(&s), "restored canary 30 %").await;
    }

    let out = route(&["list", "--output", "json"]);
    assert!(out.status.success(), "{}", show(&out));
    let views: Value = serde_json::from_slice(&out.stdout).expect("list json");
    assert_eq!(views[0]["state"], "canary 30%");
    assert_eq!(views[0]["toggle"]["rollout"], 30);
    assert_eq!(views[0]["toggle"]["enabled"], true);
    assert_eq!(views[0]["routers"].as_array().map(Vec::len), Some(2));
    assert!(
        views[0]["routers"][0]["new_requests"].as_u64().unwrap_or(0) > 0,
        "{views}"
    );
    let out = route(&["status", "orders"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("canary 30%"),
        "{}",
        show(&out)
    );

    // Clear errors: wrong Unleash token, unknown route.
    let out = cli(
        &["route", "--config", &config, "promote", "orders", "--yes"],
        &[("UNLEASH_ADMIN_TOKEN", "*:*.wrong")],
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        show(&out).contains("rejected the admin token"),
        "{}",
        show(&out)
    );
    let out = route(&["promote", "nope"]);
    assert!(
        show(&out).contains("no route named \"nope\"") && show(&out).contains("orders"),
        "{}",
        show(&out)
    );
}

#[tokio::test]
async fn rollback_takes_effect_through_overrides_when_unleash_and_a_router_are_down() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let router_config = legacy_and_route(legacy.addr, new.addr);
    let files = [("flags.json", flags_doc("strangler.orders", true, 100))];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let mut r1 = Router::start(&router_config, &files, &[]).await;
    let r2 = Router::start(&router_config, &files, &[]).await;
    for r in [&r1, &r2] {
        assert_eq!(share_new(&sides_for(r, 50).await), 1.0);
    }
    let dead_unleash = free_port().expect("port");
    let dead_router = free_port().expect("port");
    let dir = tempfile::tempdir().expect("tempdir");
    let flags = format!(
        "[flags]\nsource = \"unleash\"\nurl = \"http://127.0.0.1:{}/api/\"\n",
        dead_unleash.port()
    );
    let dead_router_url = format!("http://127.0.0.1:{}", dead_router.port());
    let config = control_config(
        dir.path(),
        legacy.addr,
        new.addr,
        &flags,
        &[&r1, &r2],
        std::slice::from_ref(&dead_router_url),
    );
    let started = Instant::now();
    let out = cli(
        &["route", "--config", &config, "rollback", "orders"],
        &[("UNLEASH_ADMIN_TOKEN", "x")],
    );
    let took = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(2),
        "partial success exits 2: {}",
        show(&out)
    );
    let text = show(&out);
    assert!(text.contains("routers: 2/3 confirmed"), "{text}");
    assert!(
        text.contains(&dead_router_url) && text.contains("unreachable"),
        "names the router that did not confirm: {text}"
    );
    assert!(text.contains("flags") && text.contains("FAILED"), "{text}");
    assert!(
        took < Duration::from_secs(5),
        "bounded by the timeout: {took:?}"
    );
    for r in [&r1, &r2] {
        assert_eq!(
            share_new(&sides_for(r, 100).await),
            0.0,
            "the overrides rolled back"
        );
    }
    // The rollback is in the history even though Unleash was down.
    let history =
        std::fs::read_to_string(dir.path().join("strangler.history.jsonl")).expect("history");
    assert!(history.contains("\"rollback\""), "{history}");
    // The flags still send everyone to new; a router that restarts keeps the
    // rollback's override (kept in `strangler.overrides.json` beside its config)
    // instead of following them.
    r1.kill_and_restart().await;
    assert_eq!(
        share_new(&sides_for(&r1, 100).await),
        0.0,
        "the override survived the restart\n{}",
        r1.log()
    );
    assert!(r1.dir.path().join("strangler.overrides.json").is_file());
}

/// Regression test for a window the soak's routing check names (#23): a forward
/// move whose override clear landed just after a concurrent rollback's override
/// lifted that rollback until the move noticed it and undid itself. A forward move
/// now clears each router's override only if its version is the one it read
/// before it looked at the history; here the interleaving is played step by step
/// against a real router: the version read, a rollback's override, the move's
/// conditional clear.
#[tokio::test]
async fn a_forward_moves_conditional_clear_never_lifts_an_override_a_rollback_set_after_it_looked()
{
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let router_config = legacy_and_route(legacy.addr, new.addr);
    let files = [("flags.json", flags_doc("strangler.orders", true, 100))];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let router = Router::start(&router_config, &files, &[]).await;
    assert_eq!(share_new(&sides_for(&router, 50).await), 1.0);
    let http = reqwest::Client::new();
    let admin = |method: reqwest::Method, path: &str| {
        http.request(method, router.admin_url(path))
            .bearer_auth(&router.token)
    };
    // The forward move reads the override's version...
    let status: serde_json::Value = admin(reqwest::Method::GET, "/routes/orders")
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    let seen = status["override_version"]
        .as_str()
        .expect("override_version")
        .to_string();
    // ... a rollback pushes its override ...
    let put = admin(reqwest::Method::PUT, "/routes/orders/override")
        .json(&serde_json::json!({"backend": "legacy"}))
        .send()
        .await
        .expect("PUT");
    assert!(put.status().is_success());
    assert_eq!(share_new(&sides_for(&router, 50).await), 0.0);
    // ... and the move's clear, conditional on what it saw, is refused.
    let clear = admin(
        reqwest::Method::DELETE,
        &format!("/routes/orders/override?if_version={seen}"),
    )
    .send()
    .await
    .expect("DELETE");
    assert_eq!(clear.status(), reqwest::StatusCode::CONFLICT);
    assert!(
        clear
            .text()
            .await
            .unwrap_or_default()
            .contains("changed since"),
        "says why"
    );
    assert_eq!(
        share_new(&sides_for(&router, 50).await),
        0.0,
        "the rollback's override holds"
    );
    // Whoever saw the rollback's version (a later forward move) may lift it.
    let status: serde_json::Value = admin(reqwest::Method::GET, "/routes/orders")
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    let now = status["override_version"].as_str().unwrap_or_default();
    let clear = admin(
        reqwest::Method::DELETE,
        &format!("/routes/orders/override?if_version={now}"),
    )
    .send()
    .await
    .expect("DELETE");
    assert!(clear.status().is_success());
    assert_eq!(share_new(&sides_for(&router, 50).await), 1.0);
}

#[tokio::test]
async fn on_the_file_source_canary_rewrites_the_flags_file_the_router_watches() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let router_config = legacy_and_route(legacy.addr, new.addr);
    let router = Router::start(
        &router_config,
        &[("flags.json", "{\"version\":2,\"features\":[]}")],
        &[],
    )
    .await;
    // The CLI uses the router's own config file: same flags file, its admin address.
    let config = router.config_path.display().to_string();
    let out = cli(
        &[
            "route", "--config", &config, "canary", "orders", "50", "--yes",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", show(&out));
    wait_share(
        &router,
        400,
        |s| (0.4..=0.6).contains(&s),
        "canary 50 % from the file",
    )
    .await;
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(router.path("flags.json")).expect("read"))
            .expect("json");
    assert_eq!(
        doc["features"][0]["strategies"][0]["parameters"]["rollout"],
        "50"
    );
    let out = cli(&["route", "--config", &config, "rollback", "orders"], &[]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(share_new(&sides_for(&router, 100).await), 0.0);
}

/// Five routers behind one name, as a Kubernetes headless Service gives them: their
/// admin APIs share a port on five loopback addresses, and a hosts-format file
/// (`STRANGLER_HOSTS_FILE`, the resolver override) maps the name to all five.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routers_found_by_a_dns_name_are_each_reached_and_a_rollback_counts_every_address() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let router_config = legacy_and_route(legacy.addr, new.addr);
    let flags = flags_doc("strangler.orders", true, 100);
    let admin = free_port().expect("port");
    let mut routers = Vec::new();
    for k in 2..=6 {
        let at = format!("127.0.0.{k}:{}", admin.port());
        routers.push(
            Router::start_admin_at(&at, &router_config, &[("flags.json", &flags)], &[]).await,
        );
    }
    for r in &routers {
        assert_eq!(share_new(&sides_for(r, 20).await), 1.0);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    let mut lines = String::from("# the fleet\n");
    for k in 2..=6 {
        lines.push_str(&format!("127.0.0.{k} routers.strangler.test\n"));
    }
    std::fs::write(&hosts, lines).expect("hosts");
    std::fs::write(dir.path().join("flags.json"), &flags).expect("flags");
    let config_path = dir.path().join("control.toml");
    std::fs::write(
        &config_path,
        format!(
            "[flags]\nfile = \"flags.json\"\n[control]\nrouters = [\"dns://routers.strangler.test:{}\"]\ntimeout_ms = 1500\n\n[legacy]\nupstream = \"{}\"\n\n{}",
            admin.port(),
            legacy.addr,
            route_section(new.addr)
        ),
    )
    .expect("control config");
    let config = config_path.display().to_string();
    let hosts = hosts.display().to_string();
    let env = [("STRANGLER_HOSTS_FILE", hosts.as_str())];

    let out = cli(&["route", "--config", &config, "status", "orders"], &env);
    assert!(out.status.success(), "{}", show(&out));
    let text = show(&out);
    for k in 2..=6 {
        assert!(
            text.contains(&format!("127.0.0.{k}:{}", admin.port())),
            "status lists every resolved router: {text}"
        );
    }

    let started = Instant::now();
    let out = cli(&["route", "--config", &config, "rollback", "orders"], &env);
    let took = started.elapsed();
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        show(&out).contains("routers: 5/5 confirmed"),
        "{}",
        show(&out)
    );
    eprintln!("rollback across 5 routers found by DNS: {took:?} (the CLI process included)");
    for r in &routers {
        assert_eq!(
            share_new(&sides_for(r, 50).await),
            0.0,
            "every router rolled back"
        );
    }

    // A router that is gone while its address still resolves: the move is not complete.
    drop(routers.pop());
    let out = cli(&["route", "--config", &config, "rollback", "orders"], &env);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let text = show(&out);
    assert!(text.contains("routers: 4/5 confirmed"), "{text}");
    assert!(
        text.contains(&format!("127.0.0.6:{}", admin.port())),
        "{text}"
    );
}

#[test]
fn completions_are_printed_for_bash() {
    let out = cli(&["completions", "bash"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("strangler") && text.contains("rollback"),
        "{text}"
    );
}

/// The config embedded under `key: |` in a Kubernetes manifest, dedented.
fn embedded(manifest: &str, key: &str) -> String {
    let mut lines = manifest
        .lines()
        .skip_while(|l| l.trim() != format!("{key}: |"));
    lines
        .next()
        .unwrap_or_else(|| panic!("{key} not in the manifest"));
    lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.get(4..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `examples/kubernetes`: the configs the manifests embed are valid (the cluster's
/// service names resolved through a hosts override: no cluster DNS here).
#[test]
fn the_kubernetes_example_manifests_embed_configs_that_config_check_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 legacy-shop.shop.svc.cluster.local orders-service.shop.svc.cluster.local\n",
    )
    .expect("hosts");
    let hosts = hosts.display().to_string();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes");
    for (file, key, kind) in [
        ("router.yaml", "strangler.toml", "router"),
        ("collector.yaml", "collector.toml", "collector"),
    ] {
        let manifest = std::fs::read_to_string(root.join(file)).expect("manifest");
        let path = dir.path().join(key);
        std::fs::write(&path, embedded(&manifest, key)).expect("config");
        let path = path.display().to_string();
        let out = cli(
            &["config", "check", "--kind", kind, &path],
            &[
                ("STRANGLER_HOSTS_FILE", hosts.as_str()),
                ("UNLEASH_CLIENT_TOKEN", "x"),
                ("STRANGLER_COLLECTOR_TOKEN", "x"),
            ],
        );
        assert!(out.status.success(), "{file}: {}", show(&out));
        assert!(show(&out).contains(": ok ("), "{}", show(&out));
    }
}

/// A router on the file flag source (the route at 0 %) and the operators' config
/// beside it: the same flags file, the router's admin API, `control_extra` added to
/// `[control]` and `route_extra` after the route. Returns the upstreams (kept for the
/// test's length), the router and the config's path.
async fn router_and_operators_config(
    control_extra: &str,
    route_extra: &str,
) -> (Upstream, Upstream, Router, String) {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let router_config = legacy_and_route(legacy.addr, new.addr);
    let router = Router::start(
        &router_config,
        &[("flags.json", &flags_doc("strangler.orders", true, 0))],
        &[],
    )
    .await;
    let config = router.path("control.toml");
    std::fs::write(
        &config,
        format!(
            "[flags]\nfile = \"flags.json\"\n[control]\nrouters = [\"{}\"]\ntimeout_ms = 1500\n{control_extra}\n\
             [legacy]\nupstream = \"{}\"\n\n{}{route_extra}",
            router.admin_url(""),
            legacy.addr,
            route_section(new.addr)
        ),
    )
    .expect("control config");
    let config = config.display().to_string();
    (legacy, new, router, config)
}

/// Two rollout controllers for one route: the second is refused and told who runs
/// the first; an operator's rollback stops the first at its next interval (it
/// never moves the route forward again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_rollout_controller_is_refused_and_an_operators_rollback_stops_the_first() {
    // A plan, and a collector that cannot answer (so every step holds).
    let dead_collector = free_port().expect("port");
    let (_legacy, _new, router, config) = router_and_operators_config(
        &format!(
            "collector_url = \"http://127.0.0.1:{}\"\n",
            dead_collector.port()
        ),
        "[route.rollout]\nsteps = [\"shadow\", \"25%\"]\ninterval_s = 0.2\nmax_step_s = 600\n",
    )
    .await;
    let history = router.path("strangler.history.jsonl");
    let log = router.path("rollout.log");
    let mut first = std::process::Command::new(strangler_bin())
        .args(["route", "--config", &config, "rollout", "orders"])
        .env("STRANGLER_ADMIN_TOKEN", "test-admin-token")
        .env("STRANGLER_ACTOR", "first-controller")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("first rollout");
    wait_until(Duration::from_secs(10), "the rollout's first step", || {
        let history = history.clone();
        async move { std::fs::read_to_string(&history).is_ok_and(|h| h.contains("rollout start")) }
    })
    .await;

    let out = cli(&["route", "--config", &config, "rollout", "orders"], &[]);
    assert!(!out.status.success(), "{}", show(&out));
    let text = show(&out);
    assert!(
        text.contains("another rollout controller is running for orders")
            && text.contains("first-controller (pid"),
        "names the holder: {text}"
    );

    let out = cli(&["route", "--config", &config, "rollback", "orders"], &[]);
    assert!(out.status.success(), "{}", show(&out));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = first.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the first controller did not stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let printed = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "rolled back: {printed}");
    assert!(printed.contains("rolled back by someone else"), "{printed}");
    assert_eq!(share_new(&sides_for(&router, 50).await), 0.0);
    // The lease went with the process: a new controller may start.
    let lease = std::fs::read_dir(router.dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .contains(".rollout-orders.lease")
        });
    assert!(lease, "the lease file sits next to the history");
}

/// Moves that race: two forward moves decided from the same state run one at a time
/// and the second is refused (the route is no longer where it was decided from); a
/// forward move and a rollback at once always end on legacy — in the history, the
/// flags and every router — whichever way they interleave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_moves_are_refused_or_lose_to_a_rollback_and_never_leave_the_route_half_moved() {
    let (_legacy, _new, router, config) = router_and_operators_config("", "").await;
    let spawn = |args: &[&str]| {
        let mut all = vec!["route", "--config", config.as_str()];
        all.extend_from_slice(args);
        std::process::Command::new(strangler_bin())
            .args(&all)
            .env("STRANGLER_ADMIN_TOKEN", "test-admin-token")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let history =
        || std::fs::read_to_string(router.path("strangler.history.jsonl")).unwrap_or_default();
    let last_to = || {
        history()
            .lines()
            .last()
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v["to"].to_string())
            .unwrap_or_default()
    };

    // The route's move lock, held by the test to make moves overlap: a command that
    // read the state waits on it, and goes on once the test lets go.
    let move_lock = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(router.path("strangler.history.jsonl.move-orders.lock"))
        .expect("lock file");

    // Two forward moves decided from canary 25 %, overlapping: one wins, the other
    // is refused.
    let out = cli(
        &[
            "route", "--config", &config, "canary", "orders", "25", "--yes",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", show(&out));
    move_lock.lock().expect("hold the move lock");
    let a = spawn(&["canary", "orders", "50", "--yes"]);
    let b = spawn(&["promote", "orders", "--yes"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    move_lock.unlock().expect("let go");
    let (a, b) = (
        a.wait_with_output().expect("a"),
        b.wait_with_output().expect("b"),
    );
    assert_eq!(
        u8::from(a.status.success()) + u8::from(b.status.success()),
        1,
        "exactly one forward move wins:\n{}\n{}",
        show(&a),
        show(&b)
    );
    let loser = if a.status.success() { &b } else { &a };
    assert!(
        show(loser).contains("moved from canary 25%"),
        "{}",
        show(loser)
    );

    // A promote decided from canary 25 % and a rollback while it waits: the
    // rollback does not wait, and the promote then finds the route moved.
    let out = cli(
        &[
            "route", "--config", &config, "canary", "orders", "25", "--yes",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", show(&out));
    move_lock.lock().expect("hold the move lock");
    let promote = spawn(&["promote", "orders", "--yes"]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let rollback = spawn(&["rollback", "orders"])
        .wait_with_output()
        .expect("rollback");
    assert!(rollback.status.success(), "{}", show(&rollback));
    move_lock.unlock().expect("let go");
    let promote = promote.wait_with_output().expect("promote");
    assert!(!promote.status.success(), "{}", show(&promote));
    assert!(last_to().contains("legacy"), "{}", history());
    assert_eq!(share_new(&sides_for(&router, 40).await), 0.0);

    // Promote and rollback started together, free to interleave, five times: the
    // route is never left half-moved — the history's last state, the flags file and
    // the router agree (legacy, or new if the promote read the state after the
    // rollback was done and went ahead as asked).
    for round in 0..5 {
        let out = cli(
            &[
                "route", "--config", &config, "canary", "orders", "25", "--yes",
            ],
            &[],
        );
        assert!(out.status.success(), "round {round}: {}", show(&out));
        let promote = spawn(&["promote", "orders", "--yes"]);
        let rollback = spawn(&["rollback", "orders"]);
        let (_, r) = (
            promote.wait_with_output().expect("promote"),
            rollback.wait_with_output().expect("rollback"),
        );
        assert!(r.status.success(), "round {round}: {}", show(&r));
        let last = last_to();
        let served_new = share_new(&sides_for(&router, 40).await);
        let flags: Value = serde_json::from_str(
            &std::fs::read_to_string(router.path("flags.json")).expect("flags"),
        )
        .expect("json");
        let toggle = &flags["features"][0];
        let flag_on =
            toggle["enabled"] == true && toggle["strategies"][0]["parameters"]["rollout"] == "100";
        // The flags file is written when the command returns; the router applies
        // it a moment later (file watch), so its side is waited for, not sampled once.
        if last.contains("legacy") {
            assert!(!flag_on, "round {round}: history legacy, flag on: {toggle}");
            if served_new != 0.0 {
                wait_share(&router, 40, |s| s == 0.0, "history legacy").await;
            }
        } else {
            assert!(last.contains("new"), "round {round}: {}", history());
            assert!(flag_on, "round {round}: history new, flag not: {toggle}");
            if served_new != 1.0 {
                wait_share(&router, 40, |s| s == 1.0, "history new").await;
            }
        }
    }
}

/// One route history in PostgreSQL (`[control] history = "postgres://…"`) shared by
/// two operators with their own copies of the config on "two machines" (two
/// directories): each sees the other's moves under the same numbers, `restore --to
/// N` means the same from either, a second rollout controller is refused whichever
/// machine it starts on, the lease goes with a killed controller's database
/// session, and concurrent promote/rollback pairs never leave the route half-moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_on_two_machines_share_one_postgres_history_its_numbers_and_its_leases() {
    let pg = strangler_testkit::Postgres::start()
        .await
        .expect("postgres");
    let db = pg.fresh_database("history").await.expect("db");
    let url = pg.url(&db);
    let dead_collector = free_port().expect("port");
    let (_legacy, _new, router, config_a) = router_and_operators_config(
        &format!(
            "history = \"{url}\"\ncollector_url = \"http://127.0.0.1:{}\"\n",
            dead_collector.port()
        ),
        "[route.rollout]\nsteps = [\"shadow\", \"25%\"]\ninterval_s = 0.2\nmax_step_s = 600\n",
    )
    .await;
    // The second operator's copy, elsewhere: the flags file by its full path.
    let elsewhere = tempfile::tempdir().expect("dir");
    let config_b = elsewhere.path().join("control.toml");
    std::fs::write(
        &config_b,
        std::fs::read_to_string(&config_a).expect("config").replace(
            "file = \"flags.json\"",
            &format!("file = \"{}\"", router.path("flags.json").display()),
        ),
    )
    .expect("copy");
    let config_b = config_b.display().to_string();
    let as_op = |config: &str, actor: &str, args: &[&str]| {
        let mut all = vec!["route", "--config", config];
        all.extend_from_slice(args);
        let out = cli(&all, &[("STRANGLER_ACTOR", actor)]);
        assert!(out.status.success(), "{args:?}: {}", show(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    };

    as_op(&config_a, "alice", &["shadow", "orders"]);
    as_op(&config_b, "bob", &["canary", "orders", "25", "--yes"]);
    as_op(&config_a, "alice", &["promote", "orders", "--yes"]);
    wait_share(&router, 40, |s| s == 1.0, "promoted").await;
    let history_a = as_op(
        &config_a,
        "alice",
        &["history", "orders", "--output", "json"],
    );
    let history_b = as_op(&config_b, "bob", &["history", "orders", "--output", "json"]);
    assert_eq!(history_a, history_b, "the same history from both machines");
    let entries: Value = serde_json::from_str(&history_a).expect("json");
    let actors: Vec<(u64, &str)> = entries
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["number"].as_u64().unwrap_or(0),
                e["actor"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(actors, vec![(1, "alice"), (2, "bob"), (3, "alice")]);
    // Nothing was written to a file beside either config.
    assert!(!router.path("strangler.history.jsonl").exists());
    assert!(!elsewhere.path().join("strangler.history.jsonl").exists());

    // Entry 2 is canary 25 % on both machines.
    as_op(
        &config_b,
        "bob",
        &["restore", "orders", "--to", "2", "--yes"],
    );
    wait_share(&router, 200, |s| s > 0.1 && s < 0.4, "canary 25 % restored").await;
    let entries: Value = serde_json::from_str(&as_op(
        &config_a,
        "alice",
        &["history", "orders", "--output", "json"],
    ))
    .expect("json");
    assert_eq!(entries.as_array().map(Vec::len), Some(4));
    assert_eq!(entries[3]["action"], "restore #2", "{entries}");

    // A rollout controller on machine A holds the lease; one on machine B is refused
    // and told who; killing A's controller frees it (its session ends); B's rollback
    // stops a controller it did not start.
    as_op(&config_a, "alice", &["rollback", "orders"]);
    let spawn_rollout = |config: &str, actor: &str| {
        std::process::Command::new(strangler_bin())
            .args(["route", "--config", config, "rollout", "orders"])
            .env("STRANGLER_ADMIN_TOKEN", "test-admin-token")
            .env("STRANGLER_ACTOR", actor)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("rollout")
    };
    let last_action = async || {
        let client = pg.connect(&db).await.expect("connect");
        client
            .query_one(
                "SELECT entry->>'action' FROM strangler_route_history ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_default()
    };
    let mut first = spawn_rollout(&config_a, "controller-a");
    wait_until(
        Duration::from_secs(10),
        "the rollout's first step",
        || async { last_action().await == "rollout start" },
    )
    .await;
    let out = cli(
        &["route", "--config", &config_b, "rollout", "orders"],
        &[("STRANGLER_ACTOR", "controller-b")],
    );
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        show(&out).contains("controller-a (pid"),
        "names the holder on the other machine: {}",
        show(&out)
    );
    first.kill().expect("SIGKILL the first controller");
    let _ = first.wait();
    let mut second = spawn_rollout(&config_b, "controller-b");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        second.try_wait().expect("wait").is_none(),
        "the second controller took the killed one's lease and runs"
    );
    as_op(&config_a, "alice", &["rollback", "orders"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the controller did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        status.code(),
        Some(1),
        "stopped by the other machine's rollback"
    );

    // Promote (machine A) and rollback (machine B) started together, five times:
    // the shared history's last state and the router always agree.
    for round in 0..5 {
        as_op(&config_a, "alice", &["canary", "orders", "25", "--yes"]);
        let spawn = |config: &str, args: &[&str]| {
            let mut all = vec!["route", "--config", config];
            all.extend_from_slice(args);
            std::process::Command::new(strangler_bin())
                .args(&all)
                .env("STRANGLER_ADMIN_TOKEN", "test-admin-token")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        };
        let promote = spawn(&config_a, &["promote", "orders", "--yes"]);
        let rollback = spawn(&config_b, &["rollback", "orders"]);
        let (_, r) = (
            promote.wait_with_output().expect("promote"),
            rollback.wait_with_output().expect("rollback"),
        );
        assert!(r.status.success(), "round {round}: {}", show(&r));
        let client = pg.connect(&db).await.expect("connect");
        let last: String = client
            .query_one(
                "SELECT entry->'to'->>'state' FROM strangler_route_history ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await
            .expect("last")
            .get(0);
        match last.as_str() {
            "legacy" => wait_share(&router, 40, |s| s == 0.0, "history legacy").await,
            "new" => wait_share(&router, 40, |s| s == 1.0, "history new").await,
            other => panic!("round {round}: half-moved: {other}"),
        }
    }
}
