//! `strangler demo` end to end, non-interactively: real databases, the example
//! shop and orders service, CDC both ways, the router, traffic, and the walk-through.

mod support;

use std::process::Command;

use support::strangler_bin;

fn number_after<'a>(text: &'a str, marker: &str) -> Option<&'a str> {
    text.find(marker)
        .map(|i| &text[i + marker.len()..])
        .and_then(|rest| rest.split_whitespace().next())
}

/// `(level, target)` of a `tracing` line (`2026-11-30T15:55:26.1Z  WARN target: …`).
fn log_line(line: &str) -> Option<(&str, &str)> {
    let mut words = line.split_whitespace();
    let time = words.next()?;
    let timestamp = time.len() > 10
        && time.as_bytes()[..4].iter().all(u8::is_ascii_digit)
        && time.as_bytes()[4] == b'-';
    let level = words.next()?;
    let target = words.next()?.trim_end_matches(':');
    (timestamp && ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level))
        .then_some((level, target))
}

#[test]
fn the_demo_finds_the_mismatch_splits_customers_and_rolls_back_without_losing_orders() {
    // As a user runs it: the default log filter, stdout and stderr both read.
    let out = Command::new(strangler_bin())
        .args(["demo", "--exit"])
        .env_remove("STRANGLER_LOG")
        .env_remove("RUST_LOG")
        .output()
        .expect("strangler demo");
    let text = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{stderr}");
    // Quiet: the steps and the commands' output, no log lines of dependencies, no
    // errors (a clean shutdown included), and short enough to read.
    for line in text.lines().chain(stderr.lines()) {
        if let Some((level, target)) = log_line(line) {
            assert!(
                level == "WARN" && target.starts_with("strangler"),
                "a {level} log line from {target}: {line}\n{text}\n{stderr}"
            );
        }
        assert!(!line.starts_with("error:"), "a command failed: {line}");
        assert!(!line.contains("warning:"), "a command warned: {line}");
        assert!(!line.contains(" stopped: "), "a part stopped: {line}");
    }
    let walkthrough = &text[text.find("1. Shadow").expect("step 1")..];
    let lines = walkthrough.lines().count();
    assert!(
        lines < 250,
        "the walk-through is {lines} lines:\n{walkthrough}"
    );
    // 1. shadow finds the deliberate difference
    let shadow =
        &text[text.find("1. Shadow").expect("step 1")..text.find("2. Deploy").expect("step 2")];
    assert!(shadow.contains("/total"), "{shadow}");
    assert!(shadow.contains("mismatch 100.0 %"), "{shadow}");
    // 2. after the fix the new pairs match: the match rate is above zero
    let fixed =
        &text[text.find("2. Deploy").expect("step 2")..text.find("3. Canary").expect("step 3")];
    let rate: f64 = number_after(fixed, "match ")
        .and_then(|s| s.trim_end_matches(',').parse().ok())
        .expect("match rate");
    assert!(rate > 10.0, "match {rate} % after the fix:\n{fixed}");
    // 3. canary: about a quarter of the customers (sticky by customer id)
    let canary =
        &text[text.find("3. Canary").expect("step 3")..text.find("4. Promote").expect("step 4")];
    let share: usize = number_after(canary, "customers served by the new service: ")
        .and_then(|s| s.split('/').next())
        .and_then(|n| n.parse().ok())
        .expect("share");
    assert!(
        (5..=22).contains(&share),
        "{share}/50 on the new service at 25 %:\n{canary}"
    );
    let promote =
        &text[text.find("4. Promote").expect("step 4")..text.find("5. Rollback").expect("step 5")];
    assert!(
        promote.contains("served by the new service: 50/50"),
        "{promote}"
    );
    // 5. rollback: everyone back on legacy, and every order the new service took is in legacy
    let rollback = &text[text.find("5. Rollback").expect("step 5")..];
    assert!(
        rollback.contains("served by the new service: 0/50"),
        "{rollback}"
    );
    let created: i64 = number_after(rollback, "created by the new service: ")
        .and_then(|s| s.trim_end_matches(';').parse().ok())
        .expect("created");
    let in_legacy: i64 = number_after(rollback, "of those in the legacy database: ")
        .and_then(|s| s.parse().ok())
        .expect("in legacy");
    assert!(created > 0, "{rollback}");
    assert_eq!(created, in_legacy, "{rollback}");
    // 6. verify is clean
    let verify = &text
        [text.find("6. Are both").expect("step 6")..text.find("7. The whole").expect("step 7")];
    assert!(!verify.contains("DIFFERENT"), "{verify}");
    assert!(verify.matches("clean").count() >= 4, "{verify}");
    // 7. the collector's stored traces tell the same story, flips included
    let story = &text[text.find("7. The whole").expect("step 7")..];
    assert!(story.contains("shadow pairs: "), "{story}");
    assert!(story.contains("/total"), "{story}");
    for change in [
        "legacy → shadow",
        "→ canary 25%",
        "→ new (promote)",
        "new → legacy (rollback)",
    ] {
        assert!(story.contains(change), "{change} missing:\n{story}");
    }
}
