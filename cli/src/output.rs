//! Printing results as aligned tables or JSON.

use std::io::Write;

use crate::control::history::Entry;
use crate::control::routers::RouterReply;
use crate::control::{Outcome, RouteView};

fn table(rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn print_json<T: serde::Serialize>(value: &T) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, value).map_err(std::io::Error::other)?;
    writeln!(stdout)
}

/// `route list` / `status`.
pub fn views(views: &[RouteView], json: bool) -> std::io::Result<()> {
    if json {
        return print_json(&views);
    }
    let mut rows = vec![
        [
            "ROUTE",
            "PATH",
            "STATE",
            "TOGGLE",
            "OVERRIDE",
            "LEGACY/MIN",
            "NEW/MIN",
            "ERRORS/MIN",
            "ROUTERS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for v in views {
        let toggle = match (&v.toggle, &v.toggle_error) {
            (Some(t), _) if !t.exists => "missing".to_string(),
            (Some(t), _) => format!(
                "{} {}",
                if t.enabled { "on" } else { "off" },
                t.rollout.map_or("-".to_string(), |r| format!("{r}%"))
            ),
            (None, _) => "unreadable".to_string(),
        };
        let overrides: Vec<String> = v
            .routers
            .iter()
            .filter_map(|r| r.override_backend.clone())
            .collect();
        let ok = v.routers.iter().filter(|r| r.error.is_none()).count();
        rows.push(vec![
            v.name.clone(),
            v.path.clone(),
            v.state.clone(),
            toggle,
            if overrides.is_empty() {
                "-".into()
            } else {
                overrides.join(",")
            },
            v.routers
                .iter()
                .map(|r| r.legacy_requests)
                .sum::<u64>()
                .to_string(),
            v.routers
                .iter()
                .map(|r| r.new_requests)
                .sum::<u64>()
                .to_string(),
            v.routers.iter().map(|r| r.errors).sum::<u64>().to_string(),
            format!("{ok}/{} up", v.routers.len()),
        ]);
    }
    print!("{}", table(rows));
    // One route: each router too (every address a `dns://` entry resolved to).
    if let [v] = views {
        let mut per_router = vec![
            [
                "ROUTER",
                "OVERRIDE",
                "LEGACY/MIN",
                "NEW/MIN",
                "ERRORS/MIN",
                "STATE",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for r in &v.routers {
            per_router.push(vec![
                r.router.clone(),
                r.override_backend.clone().unwrap_or_else(|| "-".into()),
                r.legacy_requests.to_string(),
                r.new_requests.to_string(),
                r.errors.to_string(),
                if r.error.is_some() { "DOWN" } else { "up" }.to_string(),
            ]);
        }
        print!("\n{}", table(per_router));
    }
    for v in views {
        if let Some(e) = &v.toggle_error {
            eprintln!("{}: cannot read the toggle: {e}", v.name);
        }
        for r in &v.routers {
            if let Some(e) = &r.error {
                eprintln!("{}: router {} {e}", v.name, r.router);
            }
        }
    }
    Ok(())
}

/// `route history`.
pub fn history(entries: &[Entry], json: bool) -> std::io::Result<()> {
    if json {
        let values: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                let mut v = serde_json::to_value(e).unwrap_or_default();
                v["number"] = e.number.into();
                v
            })
            .collect();
        return print_json(&values);
    }
    let mut rows = vec![
        ["#", "WHEN", "ACTOR", "FROM", "TO", "ACTION", "REASON"]
            .map(String::from)
            .to_vec(),
    ];
    for e in entries {
        rows.push(vec![
            e.number.to_string(),
            e.at.clone(),
            e.actor.clone(),
            e.from.to_string(),
            e.to.to_string(),
            e.action.clone(),
            e.reason.clone().unwrap_or_default(),
        ]);
    }
    print!("{}", table(rows));
    Ok(())
}

/// The result of lifecycle moves.
pub fn outcomes(outcomes: &[Outcome], store: &str, json: bool) -> std::io::Result<()> {
    if json {
        return print_json(&outcomes);
    }
    for o in outcomes {
        let confirmed = o.routers.iter().filter(|r| r.ok).count();
        println!(
            "{}: {} -> {} in {} ms; flags ({store}): {}; routers: {confirmed}/{} confirmed",
            o.route,
            o.from,
            o.to,
            o.took_ms,
            match &o.flags {
                Some(Ok(())) | None => "ok".to_string(),
                Some(Err(e)) => format!("FAILED: {e}"),
            },
            o.routers.len()
        );
        for r in o.routers.iter().filter(|r| !r.ok) {
            println!(
                "  router {} {}",
                r.router,
                r.error.as_deref().unwrap_or("failed")
            );
        }
    }
    Ok(())
}

/// `route compare`: the routers' shadow results, summed.
pub fn compare(
    route: &str,
    replies: &[RouterReply],
    status: &[RouterReply],
    top: usize,
    json: bool,
) -> std::io::Result<()> {
    use std::collections::HashMap;
    let docs: Vec<&serde_json::Value> = replies
        .iter()
        .filter_map(|r| r.result.as_ref().ok())
        .collect();
    let sum = |key: &str| {
        docs.iter()
            .map(|d| d[key].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let (compared, matches, mismatches, errors, skipped) = (
        sum("compared"),
        sum("matches"),
        sum("mismatches"),
        sum("shadow_errors"),
        sum("skipped"),
    );
    let mut paths: HashMap<String, u64> = HashMap::new();
    for d in &docs {
        for p in d["paths"].as_array().into_iter().flatten() {
            *paths
                .entry(p["path"].as_str().unwrap_or("").to_string())
                .or_default() += p["count"].as_u64().unwrap_or(0);
        }
    }
    let mut paths: Vec<(String, u64)> = paths.into_iter().collect();
    paths.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    paths.truncate(top);
    let mut samples: Vec<serde_json::Value> = docs
        .iter()
        .flat_map(|d| d["samples"].as_array().cloned().unwrap_or_default())
        .collect();
    samples.sort_by_key(|s| std::cmp::Reverse(s["at"].as_u64().unwrap_or(0)));
    samples.truncate(top);
    let side = |b: &str, k: &str| -> u64 {
        status
            .iter()
            .filter_map(|r| r.result.as_ref().ok())
            .map(|d| d[b][k].as_u64().unwrap_or(0))
            .sum()
    };
    let rate = |n: u64, of: u64| {
        if of == 0 {
            0.0
        } else {
            100.0 * n as f64 / of as f64
        }
    };
    if json {
        return print_json(&serde_json::json!({
            "route": route,
            "routers": replies.len(),
            "routers_answering": docs.len(),
            "compared": compared,
            "matches": matches,
            "mismatches": mismatches,
            "match_rate": if compared == 0 { serde_json::Value::Null } else { (matches as f64 / compared as f64).into() },
            "shadow_errors": errors,
            "skipped": skipped,
            "primary_last_minute": {
                "legacy": {"requests": side("legacy", "requests"), "errors": side("legacy", "errors")},
                "new": {"requests": side("new", "requests"), "errors": side("new", "errors")},
            },
            "top_paths": paths.iter().map(|(p, n)| serde_json::json!({"path": p, "count": n, "rate": rate(*n, compared) / 100.0})).collect::<Vec<_>>(),
            "samples": samples,
        }));
    }
    println!(
        "{route}: {compared} pairs compared on {}/{} routers: match {:.1} %, mismatch {:.1} %",
        docs.len(),
        replies.len(),
        rate(matches, compared),
        rate(mismatches, compared)
    );
    println!(
        "shadow errors {errors} ({:.1} % of copies), skipped {skipped}",
        rate(errors, compared + errors)
    );
    println!(
        "primary errors in the last minute: legacy {}/{}, new {}/{}",
        side("legacy", "errors"),
        side("legacy", "requests"),
        side("new", "errors"),
        side("new", "requests")
    );
    if compared == 0 {
        println!(
            "no pairs yet: turn shadowing on with `strangler route shadow {route}` and send traffic"
        );
    }
    if !paths.is_empty() {
        println!("\ndiffering paths:");
        let rows = paths
            .iter()
            .map(|(p, n)| {
                vec![
                    format!("  {p}"),
                    n.to_string(),
                    format!("{:.1} %", rate(*n, compared)),
                ]
            })
            .collect();
        print!("{}", table(rows));
    }
    if !samples.is_empty() {
        println!("\nrecent mismatches:");
        for s in &samples {
            let primary = s["primary_backend"].as_str().unwrap_or("?");
            let other = if primary == "legacy" { "new" } else { "legacy" };
            println!(
                "  {}  ({primary} answered; differs at {})",
                s["request"].as_str().unwrap_or(""),
                s["paths"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .filter_map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            );
            let differences = s["differences"].as_array().cloned().unwrap_or_default();
            if differences.is_empty() {
                println!(
                    "    - {primary:<6} {}: {}",
                    s["primary_status"],
                    one_line(s["primary_body"].as_str().unwrap_or(""))
                );
                println!(
                    "    + {other:<6} {}: {}",
                    s["shadow_status"],
                    one_line(s["shadow_body"].as_str().unwrap_or(""))
                );
            } else {
                println!("    legacy → new:");
                for line in difference_lines(&differences, primary == "legacy") {
                    println!("      {line}");
                }
            }
        }
    }
    for r in replies.iter().filter(|r| r.result.is_err()) {
        eprintln!(
            "router {} {}",
            r.url,
            r.result.as_ref().err().map_or("", String::as_str)
        );
    }
    Ok(())
}

fn one_line(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c == '\n' { ' ' } else { c })
        .collect();
    if flat.chars().count() > 160 {
        format!("{}…", flat.chars().take(160).collect::<String>())
    } else {
        flat
    }
}

/// `route calibrate`: suggested ignore rules from every router's calibration.
pub fn calibration(route: &str, replies: &[RouterReply], json: bool) -> std::io::Result<()> {
    use std::collections::HashMap;
    let docs: Vec<&serde_json::Value> = replies
        .iter()
        .filter_map(|r| r.result.as_ref().ok())
        .collect();
    let done: u64 = docs.iter().map(|d| d["done"].as_u64().unwrap_or(0)).sum();
    // Noise rates weighted by each router's pairs.
    let mut differing: HashMap<String, f64> = HashMap::new();
    for d in &docs {
        let n = d["done"].as_u64().unwrap_or(0) as f64;
        for s in d["suggestions"].as_array().into_iter().flatten() {
            *differing
                .entry(s["path"].as_str().unwrap_or("").to_string())
                .or_default() += s["noise_rate"].as_f64().unwrap_or(0.0) * n;
        }
    }
    let mut rules: Vec<(String, f64)> = differing
        .into_iter()
        .map(|(p, n)| (p, n / done.max(1) as f64))
        .collect();
    rules.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    if json {
        return print_json(&serde_json::json!({
            "route": route,
            "pairs": done,
            "complete": docs.iter().all(|d| d["complete"] == true),
            "suggestions": rules.iter().map(|(p, r)| serde_json::json!({"path": p, "noise_rate": r})).collect::<Vec<_>>(),
        }));
    }
    println!("{route}: {done} legacy-vs-legacy pairs compared");
    if rules.is_empty() {
        println!("no noise found: two legacy answers to the same request were identical");
        return Ok(());
    }
    let pointers: Vec<&(String, f64)> = rules.iter().filter(|(p, _)| p.starts_with('/')).collect();
    let headers: Vec<&(String, f64)> = rules
        .iter()
        .filter(|(p, _)| p.starts_with("header:"))
        .collect();
    println!(
        "\n# noise learned by `strangler route calibrate {route}`; add to the route in strangler.toml"
    );
    println!("[route.shadow]");
    if !pointers.is_empty() {
        println!("ignore = [");
        for (p, r) in &pointers {
            println!(
                "  \"{p}\",  # differs in {:.1} % of legacy pairs",
                r * 100.0
            );
        }
        println!("]");
    }
    if !headers.is_empty() {
        println!("ignore_headers = [");
        for (p, r) in &headers {
            println!(
                "  \"{}\",  # {:.1} %",
                p.trim_start_matches("header:"),
                r * 100.0
            );
        }
        println!("]");
    }
    for (p, r) in rules
        .iter()
        .filter(|(p, _)| !p.starts_with('/') && !p.starts_with("header:"))
    {
        println!(
            "# {p} differs in {:.1} % of legacy pairs: legacy itself is not deterministic here",
            r * 100.0
        );
    }
    Ok(())
}

/// At most 200 characters of a body, for a terminal (`--output json` has them whole).
fn clip(body: &str) -> String {
    match body.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &body[..at]),
        None => body.to_string(),
    }
}

/// The collector's numbers for a route over a window (`strangler compare ROUTE --since`):
/// the same named queries as the dashboard's route page.
pub fn stored_compare(doc: &serde_json::Value, top: usize, json: bool) -> std::io::Result<()> {
    if json {
        return print_json(doc);
    }
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let ms = |v: &serde_json::Value| match v.as_f64() {
        Some(x) => format!("{x:.1}"),
        None => "-".into(),
    };
    let time = |v: &serde_json::Value| {
        let secs = v.as_u64().or_else(|| {
            v.as_str().and_then(|s| {
                // The queries return times as DateTime('UTC').
                humantime::parse_rfc3339(&format!("{}Z", s.replace(' ', "T")))
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs())
            })
        });
        secs.map_or_else(
            || v.as_str().unwrap_or("?").to_string(),
            |s| {
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
                )
                .to_string()
            },
        )
    };
    let rows = |key: &str| doc[key].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    let window = doc["to"].as_u64().unwrap_or(0) - doc["from"].as_u64().unwrap_or(0);
    out.push_str(&format!(
        "{}: legacy vs new over the last {} (stored traces)\n\n",
        doc["route"].as_str().unwrap_or("?"),
        humantime::format_duration(std::time::Duration::from_secs(window))
    ));
    let sides = rows("route_sides");
    if sides.is_empty() {
        out.push_str("no traffic on this route in the window\n");
    } else {
        let mut t = vec![vec![
            "SIDE".to_string(),
            "TRAFFIC".into(),
            "REQUESTS".into(),
            "ERRORS".into(),
            "ERROR %".into(),
            "P50 MS".into(),
            "P95 MS".into(),
            "P99 MS".into(),
        ]];
        for s in &sides {
            let (n, e) = (num(&s["requests"]), num(&s["errors"]));
            t.push(vec![
                s["backend"].as_str().unwrap_or("?").to_string(),
                if num(&s["shadow"]) > 0.0 {
                    "shadow copies".into()
                } else {
                    "served".into()
                },
                format!("{n:.0}"),
                format!("{e:.0}"),
                if n > 0.0 {
                    format!("{:.2}", 100.0 * e / n)
                } else {
                    "-".into()
                },
                ms(&s["p50_ms"]),
                ms(&s["p95_ms"]),
                ms(&s["p99_ms"]),
            ]);
        }
        out.push_str(&table(t));
        let (m, x) = sides.iter().fold((0.0, 0.0), |(m, x), s| {
            (m + num(&s["diff_match"]), x + num(&s["diff_mismatch"]))
        });
        if m + x > 0.0 {
            out.push_str(&format!(
                "\nshadow pairs: {:.0} compared, {:.0} match ({:.1} %), {:.0} differ\n",
                m + x,
                m,
                100.0 * m / (m + x),
                x
            ));
        } else {
            out.push_str("\nshadow pairs: none in the window\n");
        }
    }
    let paths = rows("route_diff_paths");
    if !paths.is_empty() {
        out.push_str("\ndiffering paths:\n");
        let mut t = vec![vec!["PATH".to_string(), "MISMATCHES".into()]];
        for p in paths.iter().take(top) {
            t.push(vec![
                p["path"].as_str().unwrap_or("").to_string(),
                format!("{:.0}", num(&p["mismatches"])),
            ]);
        }
        out.push_str(&table(t));
    }
    let samples = rows("route_mismatches");
    if !samples.is_empty() {
        out.push_str("\nsample mismatches:\n");
        for s in samples.iter().take(top) {
            let differences: Vec<serde_json::Value> = s["differences"]
                .as_str()
                .and_then(|d| serde_json::from_str(d).ok())
                .unwrap_or_default();
            if !differences.is_empty() {
                out.push_str(&format!(
                    "  {}  {}  trace {}\n    legacy → new:\n",
                    time(&s["time"]),
                    s["request"].as_str().unwrap_or(""),
                    s["trace_id"].as_str().unwrap_or(""),
                ));
                let primary_is_legacy = s["primary_backend"].as_str() != Some("new");
                for line in difference_lines(&differences, primary_is_legacy) {
                    out.push_str(&format!("      {line}\n"));
                }
                continue;
            }
            out.push_str(&format!(
                "  {}  {}  trace {}  differs at {}\n    {} {:.0}: {}\n    other {:.0}: {}\n",
                time(&s["time"]),
                s["request"].as_str().unwrap_or(""),
                s["trace_id"].as_str().unwrap_or(""),
                s["diff_paths"].as_str().unwrap_or(""),
                s["primary_backend"].as_str().unwrap_or("primary"),
                num(&s["primary_status"]),
                clip(s["primary_body"].as_str().unwrap_or("")),
                num(&s["shadow_status"]),
                clip(s["shadow_body"].as_str().unwrap_or("")),
            ));
        }
    }
    let changes = rows("route_changes");
    if !changes.is_empty() {
        out.push_str("\nchanges in the window:\n");
        for c in &changes {
            out.push_str(&format!(
                "  {}  {} by {}{}\n",
                time(&c["time"]),
                c["text"].as_str().unwrap_or(""),
                c["actor"].as_str().unwrap_or("?"),
                c["reason"]
                    .as_str()
                    .filter(|r| !r.is_empty())
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ));
        }
    }
    std::io::stdout().write_all(out.as_bytes())
}

/// `/total: "12.30" → 12.3` for each difference, legacy's value first whichever
/// side answered the client (`primary_is_legacy`).
pub fn difference_lines(differences: &[serde_json::Value], primary_is_legacy: bool) -> Vec<String> {
    differences
        .iter()
        .map(|d| {
            let (primary, shadow) = (
                d["primary"].as_str().unwrap_or(""),
                d["shadow"].as_str().unwrap_or(""),
            );
            let (legacy, new) = if primary_is_legacy {
                (primary, shadow)
            } else {
                (shadow, primary)
            };
            format!(
                "{}: {} → {}",
                d["path"].as_str().unwrap_or(""),
                one_line(legacy),
                one_line(new)
            )
        })
        .collect()
}

/// One endpoint template of legacy traffic, as `strangler routes suggest` reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Suggestion {
    /// `/api/orders/{id}`.
    pub template: String,
    /// Methods seen.
    pub methods: Vec<String>,
    /// Requests in the window.
    pub requests: u64,
    /// Requests per minute over the window.
    pub requests_per_min: f64,
    /// Share of all traffic legacy served in the window (0..1).
    pub share: f64,
    /// Failed requests (5xx or no answer) / requests.
    pub error_rate: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Routes that already match it (still on legacy); empty: no route yet.
    pub covered_by: Vec<String>,
}

/// The `legacy_endpoints` rows of an overview answer as suggestions.
pub fn suggestions(doc: &serde_json::Value) -> Vec<Suggestion> {
    let window_min =
        (doc["to"].as_f64().unwrap_or(0.0) - doc["from"].as_f64().unwrap_or(0.0)).max(1.0) / 60.0;
    let num = |v: &serde_json::Value| {
        v.as_f64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(0.0)
    };
    let list = |v: &serde_json::Value| -> Vec<String> {
        v.as_str()
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    doc["legacy_endpoints"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    let requests = num(&r["requests"]);
                    Suggestion {
                        template: r["template"].as_str().unwrap_or("").to_string(),
                        methods: list(&r["methods"]),
                        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                        requests: requests as u64,
                        requests_per_min: requests / window_min,
                        share: num(&r["share"]),
                        error_rate: if requests > 0.0 {
                            num(&r["errors"]) / requests
                        } else {
                            0.0
                        },
                        p50_ms: num(&r["p50_ms"]),
                        p99_ms: num(&r["p99_ms"]),
                        covered_by: list(&r["routes"]),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Prints the suggestions: most traffic first.
pub fn route_suggestions(list: &[Suggestion], since: &str, json: bool) -> std::io::Result<()> {
    if json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!(
            "no legacy traffic with a path in the last {since} (is the router exporting to this collector?)"
        );
        return Ok(());
    }
    println!("legacy traffic by endpoint over the last {since}, most requested first:\n");
    let mut rows = vec![vec![
        "ENDPOINT".to_string(),
        "METHODS".into(),
        "REQ/MIN".into(),
        "SHARE".into(),
        "ERROR %".into(),
        "P50 MS".into(),
        "P99 MS".into(),
        "ROUTE".into(),
    ]];
    for s in list {
        rows.push(vec![
            s.template.clone(),
            s.methods.join(","),
            format!("{:.1}", s.requests_per_min),
            format!("{:.1} %", s.share * 100.0),
            format!("{:.2}", s.error_rate * 100.0),
            format!("{:.1}", s.p50_ms),
            format!("{:.1}", s.p99_ms),
            if s.covered_by.is_empty() {
                "(none yet)".into()
            } else {
                format!("{} (on legacy)", s.covered_by.join(","))
            },
        ]);
    }
    print!("{}", table(rows));
    if let Some(next) = list.iter().find(|s| s.covered_by.is_empty()) {
        println!(
            "\nbusiest endpoint without a route: {} ({:.1} % of legacy traffic)",
            next.template,
            next.share * 100.0
        );
    }
    Ok(())
}
