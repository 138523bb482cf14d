//! The Grafana dashboard for the grafana-clickhouse-datasource plugin (v4), built
//! from the named queries. `dashboards/grafana/strangler.json` is this output; a
//! test keeps the file and the queries in step.

use serde_json::{Value, json};

use crate::query::{QUERIES, Scope, Shape, get};

/// The plugin's id.
pub const PLUGIN: &str = "grafana-clickhouse-datasource";
/// The dashboard's stable uid (links keep working across imports).
pub const UID: &str = "strangler-old-vs-new";

fn datasource() -> Value {
    json!({ "type": PLUGIN, "uid": "${datasource}" })
}

fn target(sql: &str, shape: Shape) -> Value {
    // The plugin's formats: 0 time series, 1 table.
    let (format, query_type) = match shape {
        Shape::TimeSeries => (0, "timeseries"),
        Shape::Table => (1, "table"),
    };
    json!({
        "datasource": datasource(),
        "editorType": "sql",
        "format": format,
        "queryType": query_type,
        "rawSql": sql.trim_end(),
        "refId": "A",
    })
}

fn panel(id: u32, name: &str, grid: (u32, u32, u32, u32)) -> Value {
    let q = get(name).unwrap_or_else(|| panic!("named query {name} exists"));
    let (x, y, w, h) = grid;
    let kind = match q.shape {
        Shape::TimeSeries => "timeseries",
        Shape::Table => "table",
    };
    let mut p = json!({
        "id": id,
        "type": kind,
        "title": q.title,
        "description": format!("Named query `{}` (dashboards/sql/{}.sql).", q.name, q.name),
        "datasource": datasource(),
        "gridPos": { "x": x, "y": y, "w": w, "h": h },
        "fieldConfig": { "defaults": { "unit": q.unit }, "overrides": [] },
        "options": {},
        "targets": [target(q.sql, q.shape)],
    });
    if q.shape == Shape::TimeSeries {
        p["fieldConfig"]["defaults"]["custom"] = json!({ "spanNulls": false, "lineWidth": 2 });
        p["options"] = json!({ "legend": { "displayMode": "list", "placement": "bottom" }, "tooltip": { "mode": "multi" } });
    }
    p
}

fn row(id: u32, title: &str, y: u32, collapsed: bool, panels: Vec<Value>) -> Value {
    json!({
        "id": id,
        "type": "row",
        "title": title,
        "collapsed": collapsed,
        "gridPos": { "x": 0, "y": y, "w": 24, "h": 1 },
        "panels": panels,
    })
}

/// The dashboard JSON, importable as is (Dashboards → New → Import).
pub fn dashboard() -> Value {
    let route_names = get("route_names").map(|q| q.sql.trim_end()).unwrap_or("");
    let changes = get("route_changes").map(|q| q.sql.trim_end()).unwrap_or("");
    let panels = vec![
        row(100, "Overview", 0, false, vec![]),
        panel(1, "overview_routes", (0, 1, 24, 8)),
        panel(2, "overview_burndown", (0, 9, 12, 8)),
        panel(3, "overview_sparklines", (12, 9, 12, 8)),
        panel(13, "legacy_endpoints", (0, 17, 24, 8)),
        row(101, "Route $route", 25, false, vec![]),
        panel(4, "route_traffic", (0, 26, 8, 8)),
        panel(5, "route_errors", (8, 26, 8, 8)),
        panel(6, "route_latency", (16, 26, 8, 8)),
        panel(7, "route_sides", (0, 34, 12, 7)),
        panel(8, "route_diff_paths", (12, 34, 12, 7)),
        panel(9, "route_mismatches", (0, 41, 24, 9)),
        panel(10, "route_changes", (0, 50, 12, 6)),
        panel(12, "route_evidence", (12, 50, 12, 6)),
        row(
            102,
            "Trace $trace_id",
            56,
            true,
            vec![panel(11, "trace_spans", (0, 57, 24, 10))],
        ),
    ];
    json!({
        "__inputs": [{
            "name": "DS_CLICKHOUSE",
            "label": "ClickHouse",
            "type": "datasource",
            "pluginId": PLUGIN,
            "pluginName": "ClickHouse",
        }],
        "__requires": [
            { "type": "datasource", "id": PLUGIN, "name": "ClickHouse", "version": "4.0.0" },
            { "type": "grafana", "id": "grafana", "name": "Grafana", "version": "9.0.0" },
        ],
        "uid": UID,
        "title": "strangler: legacy vs new",
        "description": "Per-route comparison of the legacy monolith and the new service, from strangler's collector tables in ClickHouse.",
        "tags": ["strangler"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": true,
        "refresh": "30s",
        "time": { "from": "now-1h", "to": "now" },
        "timepicker": { "refresh_intervals": ["10s", "30s", "1m", "5m"] },
        "templating": { "list": [
            {
                "name": "datasource",
                "label": "ClickHouse",
                "type": "datasource",
                "query": PLUGIN,
                "current": {},
                "hide": 0,
            },
            {
                "name": "database",
                "label": "Database",
                "type": "textbox",
                "query": "strangler",
                "current": { "text": "strangler", "value": "strangler" },
                "hide": 0,
            },
            {
                "name": "route",
                "label": "Route",
                "type": "query",
                "datasource": datasource(),
                "query": route_names,
                "definition": route_names,
                "refresh": 2,
                "sort": 1,
                "current": {},
                "hide": 0,
            },
            {
                "name": "trace_id",
                "label": "Trace id",
                "type": "textbox",
                "query": "",
                "current": { "text": "", "value": "" },
                "hide": 0,
            },
        ]},
        "annotations": { "list": [
            {
                "name": "Annotations & Alerts",
                "builtIn": 1,
                "datasource": { "type": "grafana", "uid": "-- Grafana --" },
                "enable": true,
                "hide": true,
                "iconColor": "rgba(0, 211, 255, 1)",
                "type": "dashboard",
            },
            {
                "name": "Route changes",
                "datasource": datasource(),
                "enable": true,
                "iconColor": "orange",
                "target": target(changes, Shape::Table),
            },
        ]},
        "panels": panels,
    })
}

/// Every SQL text the dashboard holds (panels, variables, annotations), with where
/// it sits, for validation.
pub fn all_sql(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(sql) = t["rawSql"].as_str() {
                    out.push((format!("panel {:?}", p["title"]), sql.to_string()));
                }
            }
            panels(&p["panels"], out);
        }
    }
    panels(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] == "query"
            && let Some(sql) = v["query"].as_str()
        {
            out.push((format!("variable {:?}", v["name"]), sql.to_string()));
        }
    }
    for a in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(sql) = a["target"]["rawSql"].as_str() {
            out.push((format!("annotation {:?}", a["name"]), sql.to_string()));
        }
    }
    out
}

/// Named queries every dashboard panel must cover (all but the support queries).
pub fn panel_queries() -> impl Iterator<Item = &'static str> {
    QUERIES
        .iter()
        .filter(|q| q.scope != Scope::Support)
        .map(|q| q.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMITTED: &str = include_str!("../grafana/strangler.json");

    #[test]
    fn the_committed_dashboard_is_the_generated_one() {
        let generated = serde_json::to_string_pretty(&dashboard()).expect("serialises") + "\n";
        if std::env::var_os("STRANGLER_UPDATE_GRAFANA").is_some() {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/strangler.json");
            std::fs::write(path, &generated).expect("writes");
            return;
        }
        assert!(
            COMMITTED == generated,
            "dashboards/grafana/strangler.json is stale: run \
             STRANGLER_UPDATE_GRAFANA=1 cargo test -p strangler-dashboards"
        );
    }

    #[test]
    fn every_panel_query_is_on_the_dashboard_in_the_plugin_v4_shape() {
        let d = dashboard();
        let sql = all_sql(&d);
        for name in panel_queries() {
            let q = get(name).expect("exists");
            assert!(
                sql.iter().any(|(_, s)| s == q.sql.trim_end()),
                "{name} missing"
            );
        }
        fn check(list: &Value) {
            for p in list.as_array().into_iter().flatten() {
                for t in p["targets"].as_array().into_iter().flatten() {
                    assert_eq!(t["editorType"], "sql");
                    assert_eq!(t["datasource"]["type"], PLUGIN);
                }
                check(&p["panels"]);
            }
        }
        check(&d["panels"]);
    }
}
