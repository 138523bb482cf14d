//! Comparing a primary response with its shadow: status, a set of headers, and
//! bodies (JSON structurally, anything else by normalized bytes).

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;

/// At most this many differing paths are reported per pair.
pub const MAX_PATHS: usize = 20;

/// Headers that differ between any two responses and say nothing about behaviour.
pub const DEFAULT_IGNORED_HEADERS: &[&str] = &[
    "date",
    "server",
    "set-cookie",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "via",
    "age",
    "expires",
    "etag",
    "last-modified",
    "x-request-id",
    "x-runtime",
    "traceparent",
    "tracestate",
];

/// A response as far as the comparison needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The body, up to the buffering limit.
    pub body: Vec<u8>,
    /// The body was longer than the limit.
    pub truncated: bool,
}

impl Captured {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A pointer pattern that is not a JSON pointer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JSON pointer {0:?} must start with '/'")]
pub struct BadPointer(pub String);

/// A JSON pointer pattern: `/items/*/price`; `*` matches any one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointerPattern(Vec<String>);

impl PointerPattern {
    /// Parses `/a/*/b` (an empty string or `/` is the whole document).
    pub fn parse(text: &str) -> Result<Self, BadPointer> {
        if !(text.is_empty() || text.starts_with('/')) {
            return Err(BadPointer(text.to_string()));
        }
        Ok(Self(
            text.split('/')
                .skip(1)
                .filter(|s| !s.is_empty())
                .map(|s| s.replace("~1", "/").replace("~0", "~"))
                .collect(),
        ))
    }

    /// Whether `path` (segments) is this pattern or lies under it.
    fn covers(&self, path: &[String]) -> bool {
        self.0.len() <= path.len() && self.0.iter().zip(path).all(|(p, s)| p == "*" || p == s)
    }

    /// Whether `path` is exactly this pattern.
    fn is(&self, path: &[String]) -> bool {
        self.0.len() == path.len() && self.covers(path)
    }
}

/// Per-route comparison rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// JSON paths (and everything under them) left out of the comparison.
    pub ignore_paths: Vec<PointerPattern>,
    /// Header names (lowercase) left out, beyond [`DEFAULT_IGNORED_HEADERS`].
    pub ignore_headers: HashSet<String>,
    /// Arrays compared as multisets (order ignored).
    pub array_sets: Vec<PointerPattern>,
}

/// The outcome for one pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Same status, headers and body.
    Match,
    /// The differing places: `status`, `header:NAME`, JSON pointers, or `body`.
    Mismatch(Vec<String>),
    /// Could not be compared (a body over the limit).
    Skipped(String),
}

fn pointer(path: &[String]) -> String {
    if path.is_empty() {
        return "/".into();
    }
    path.iter()
        .map(|s| format!("/{}", s.replace('~', "~0").replace('/', "~1")))
        .collect()
}

fn numbers_equal(a: &serde_json::Number, b: &serde_json::Number) -> bool {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return x == y;
    }
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Structural equality under the rules (used for set comparison).
fn json_equal(a: &Value, b: &Value, path: &mut Vec<String>, rules: &Rules) -> bool {
    let mut out = Vec::new();
    diff_json(a, b, path, rules, &mut out);
    out.is_empty()
}

fn diff_json(a: &Value, b: &Value, path: &mut Vec<String>, rules: &Rules, out: &mut Vec<String>) {
    if rules.ignore_paths.iter().any(|p| p.covers(path)) {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for key in keys {
                path.push(key.clone());
                match (x.get(key), y.get(key)) {
                    (Some(va), Some(vb)) => diff_json(va, vb, path, rules, out),
                    _ => {
                        if !rules.ignore_paths.iter().any(|p| p.covers(path)) {
                            out.push(pointer(path));
                        }
                    }
                }
                path.pop();
            }
        }
        (Value::Array(x), Value::Array(y)) if rules.array_sets.iter().any(|p| p.is(path)) => {
            // Multiset: every element of one side pairs with an equal one on the other.
            let mut unmatched: Vec<&Value> = y.iter().collect();
            let mut extra = false;
            for item in x {
                match unmatched
                    .iter()
                    .position(|c| json_equal(item, c, &mut path.clone(), rules))
                {
                    Some(i) => {
                        unmatched.swap_remove(i);
                    }
                    None => extra = true,
                }
            }
            if extra || !unmatched.is_empty() {
                out.push(pointer(path));
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            for i in 0..x.len().max(y.len()) {
                path.push(i.to_string());
                match (x.get(i), y.get(i)) {
                    (Some(va), Some(vb)) => diff_json(va, vb, path, rules, out),
                    _ => {
                        if !rules.ignore_paths.iter().any(|p| p.covers(path)) {
                            out.push(pointer(path));
                        }
                    }
                }
                path.pop();
            }
        }
        (Value::Number(x), Value::Number(y)) => {
            if !numbers_equal(x, y) {
                out.push(pointer(path));
            }
        }
        _ => {
            if a != b {
                out.push(pointer(path));
            }
        }
    }
}

fn is_json(r: &Captured) -> bool {
    r.header("content-type").is_some_and(|ct| {
        let ct = ct.to_ascii_lowercase();
        ct.starts_with("application/json") || ct.contains("+json")
    })
}

/// Bytes with line endings unified and trailing whitespace removed per line.
fn normalized(body: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(body);
    text.replace("\r\n", "\n")
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
        .trim_end()
        .as_bytes()
        .to_vec()
}

/// Compares `primary` with `shadow`.
pub fn compare(primary: &Captured, shadow: &Captured, rules: &Rules) -> Verdict {
    if primary.truncated || shadow.truncated {
        return Verdict::Skipped("body over the buffering limit".into());
    }
    let mut paths = Vec::new();
    if primary.status != shadow.status {
        paths.push("status".to_string());
    }
    let ignored = |name: &str| {
        DEFAULT_IGNORED_HEADERS.contains(&name)
            || rules.ignore_headers.contains(name)
            || name.starts_with("x-strangler-")
    };
    let mut headers: BTreeMap<&str, (Option<&str>, Option<&str>)> = BTreeMap::new();
    for (k, v) in &primary.headers {
        headers.entry(k.as_str()).or_default().0 = Some(v.as_str());
    }
    for (k, v) in &shadow.headers {
        headers.entry(k.as_str()).or_default().1 = Some(v.as_str());
    }
    for (name, (a, b)) in headers {
        if ignored(name) {
            continue;
        }
        let differs = match (a, b) {
            // Content types compare without parameters' spacing and case.
            (Some(x), Some(y)) if name == "content-type" => {
                x.to_ascii_lowercase().replace(' ', "") != y.to_ascii_lowercase().replace(' ', "")
            }
            (x, y) => x != y,
        };
        if differs {
            paths.push(format!("header:{name}"));
        }
    }
    if is_json(primary) && is_json(shadow) {
        match (
            serde_json::from_slice::<Value>(&primary.body),
            serde_json::from_slice::<Value>(&shadow.body),
        ) {
            (Ok(a), Ok(b)) => diff_json(&a, &b, &mut Vec::new(), rules, &mut paths),
            _ => {
                if normalized(&primary.body) != normalized(&shadow.body) {
                    paths.push("body".into());
                }
            }
        }
    } else if normalized(&primary.body) != normalized(&shadow.body) {
        paths.push("body".into());
    }
    if paths.is_empty() {
        Verdict::Match
    } else {
        paths.truncate(MAX_PATHS);
        Verdict::Mismatch(paths)
    }
}

/// One place where the two answers differ, with each side's value as short text
/// (JSON values as JSON: `"12.30"` is a string, `12.3` a number).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Difference {
    /// The path as the comparison names it (`/total`, `status`, `header:etag`, `body`).
    pub path: String,
    /// The primary's value there (`(absent)` when it has none).
    pub primary: String,
    /// The shadow's value there.
    pub shadow: String,
}

/// Differences listed per pair.
pub const MAX_DIFFERENCES: usize = 10;
/// A value longer than this many characters is cut, with `…`.
const VALUE_CHARS: usize = 120;
const ABSENT: &str = "(absent)";

fn clip(text: String) -> String {
    match text.char_indices().nth(VALUE_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text,
    }
}

/// Both sides' values at each differing path (the first [`MAX_DIFFERENCES`]),
/// whatever the size of the bodies: only the values travel, not the bodies.
pub fn differences(primary: &Captured, shadow: &Captured, paths: &[String]) -> Vec<Difference> {
    let json = |c: &Captured| serde_json::from_slice::<Value>(&c.body).ok();
    let needs_json = paths.iter().any(|p| p.is_empty() || p.starts_with('/'));
    let (a, b) = if needs_json {
        (json(primary), json(shadow))
    } else {
        (None, None)
    };
    let at = |doc: &Option<Value>, pointer: &str| {
        doc.as_ref()
            .and_then(|d| d.pointer(pointer))
            .map_or_else(|| ABSENT.to_string(), |v| clip(v.to_string()))
    };
    let header = |c: &Captured, name: &str| {
        c.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map_or_else(|| ABSENT.to_string(), |(_, v)| clip(v.clone()))
    };
    paths
        .iter()
        .take(MAX_DIFFERENCES)
        .map(|path| {
            let (p, s) = if path == "status" {
                (primary.status.to_string(), shadow.status.to_string())
            } else if let Some(name) = path.strip_prefix("header:") {
                (header(primary, name), header(shadow, name))
            } else if path == "body" {
                body_excerpts(&primary.body, &shadow.body)
            } else {
                (at(&a, path), at(&b, path))
            };
            Difference {
                path: path.clone(),
                primary: p,
                shadow: s,
            }
        })
        .collect()
}

/// For bodies that are not JSON: each side from a little before the first byte
/// where they differ.
fn body_excerpts(a: &[u8], b: &[u8]) -> (String, String) {
    let first = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let from = first.saturating_sub(20);
    let excerpt = |body: &[u8]| {
        let text = String::from_utf8_lossy(body.get(from..).unwrap_or_default()).into_owned();
        let text = clip(text);
        if from > 0 { format!("…{text}") } else { text }
    };
    (excerpt(a), excerpt(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_show_both_values_at_each_path_whatever_the_body_size() {
        // 10 kB bodies, the difference in the last field.
        let filler: Vec<String> = (0..400).map(|i| format!("item-{i:05}")).collect();
        let legacy = json(&serde_json::json!({"items": filler, "total": "12.30"}).to_string());
        let new = json(&serde_json::json!({"items": filler, "total": 12.3}).to_string());
        assert!(legacy.body.len() > 5_000);
        let Verdict::Mismatch(paths) = compare(&legacy, &new, &Rules::default()) else {
            panic!("they differ");
        };
        let d = differences(&legacy, &new, &paths);
        assert_eq!(
            d,
            vec![Difference {
                path: "/total".into(),
                primary: "\"12.30\"".into(),
                shadow: "12.3".into()
            }]
        );
        let mut other = new.clone();
        other.status = 500;
        other.body = b"oops".to_vec();
        let d = differences(&legacy, &other, &["status".into(), "/total".into()]);
        assert_eq!(
            (d[0].primary.as_str(), d[0].shadow.as_str()),
            ("200", "500")
        );
        assert_eq!(d[1].shadow, ABSENT);
    }

    fn json(body: &str) -> Captured {
        Captured {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.as_bytes().to_vec(),
            truncated: false,
        }
    }

    fn rules(ignore: &[&str], sets: &[&str]) -> Rules {
        Rules {
            ignore_paths: ignore
                .iter()
                .map(|p| PointerPattern::parse(p).expect("pattern"))
                .collect(),
            ignore_headers: HashSet::new(),
            array_sets: sets
                .iter()
                .map(|p| PointerPattern::parse(p).expect("pattern"))
                .collect(),
        }
    }

    #[test]
    fn key_order_and_number_forms_do_not_matter() {
        let a = json(r#"{"id": 1, "total": 10.0, "items": [1, 2]}"#);
        let b = json(r#"{"items": [1, 2], "total": 10, "id": 1}"#);
        assert_eq!(compare(&a, &b, &Rules::default()), Verdict::Match);
    }

    #[test]
    fn a_renamed_field_shows_both_paths() {
        let a = json(r#"{"id": 1, "total_cents": 1000}"#);
        let b = json(r#"{"id": 1, "totalCents": 1000}"#);
        assert_eq!(
            compare(&a, &b, &Rules::default()),
            Verdict::Mismatch(vec!["/totalCents".into(), "/total_cents".into()])
        );
    }

    #[test]
    fn ignore_rules_with_wildcards_and_array_sets_apply() {
        let a = json(
            r#"{"meta": {"generated_at": "t1"}, "rows": [{"at": 1, "v": 1}, {"at": 2, "v": 2}], "tags": ["a", "b"]}"#,
        );
        let b = json(
            r#"{"meta": {"generated_at": "t2"}, "rows": [{"at": 3, "v": 1}, {"at": 4, "v": 2}], "tags": ["b", "a"]}"#,
        );
        assert_eq!(
            compare(&a, &b, &rules(&[], &[])),
            Verdict::Mismatch(vec![
                "/meta/generated_at".into(),
                "/rows/0/at".into(),
                "/rows/1/at".into(),
                "/tags/0".into(),
                "/tags/1".into()
            ])
        );
        assert_eq!(
            compare(
                &a,
                &b,
                &rules(&["/meta/generated_at", "/rows/*/at"], &["/tags"])
            ),
            Verdict::Match
        );
    }

    #[test]
    fn status_and_headers_are_compared_except_volatile_ones() {
        let mut a = json("{}");
        let mut b = json("{}");
        a.headers.push(("date".into(), "Mon".into()));
        b.headers.push(("date".into(), "Tue".into()));
        assert_eq!(compare(&a, &b, &Rules::default()), Verdict::Match);
        b.headers.push(("cache-control".into(), "no-store".into()));
        b.status = 201;
        assert_eq!(
            compare(&a, &b, &Rules::default()),
            Verdict::Mismatch(vec!["status".into(), "header:cache-control".into()])
        );
    }

    #[test]
    fn non_json_bodies_compare_by_normalized_bytes() {
        let page = |body: &str| Captured {
            status: 200,
            headers: vec![("content-type".into(), "text/html".into())],
            body: body.as_bytes().to_vec(),
            truncated: false,
        };
        assert_eq!(
            compare(
                &page("<p>hi</p>  \r\n"),
                &page("<p>hi</p>\n"),
                &Rules::default()
            ),
            Verdict::Match
        );
        assert_eq!(
            compare(&page("<p>hi</p>"), &page("<p>ho</p>"), &Rules::default()),
            Verdict::Mismatch(vec!["body".into()])
        );
        let mut big = page("x");
        big.truncated = true;
        assert!(matches!(
            compare(&big, &page("x"), &Rules::default()),
            Verdict::Skipped(_)
        ));
    }

    #[test]
    fn pointers_escape_slashes_and_tildes() {
        let a = json(r#"{"a/b": 1, "c~d": 1}"#);
        let b = json(r#"{"a/b": 2, "c~d": 2}"#);
        assert_eq!(
            compare(&a, &b, &Rules::default()),
            Verdict::Mismatch(vec!["/a~1b".into(), "/c~0d".into()])
        );
        assert!(PointerPattern::parse("nope").is_err());
    }
}
