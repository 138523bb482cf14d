//! Printing results as aligned tables or JSON.

use std::io::Write;

use crate::control::history::Entry;
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
