-- Every route over the window: lifecycle state, traffic per side, error rate and
-- p99 for both sides, shadow match rate. Exact counts: from the router's aggregates
-- where it exports them, else from its spans (route_stats holds both, each request
-- once). The new side's error rate includes fallbacks (requests it failed that
-- legacy then answered). p99 is read from the router's latency buckets (±1.1 %).
SELECT
    route,
    state,
    legacy_requests,
    new_requests,
    if(legacy_requests + new_requests = 0, NULL, new_requests / (legacy_requests + new_requests)) AS new_share,
    if(legacy_seen = 0, NULL, legacy_errors / legacy_seen) AS legacy_error_rate,
    if(new_seen + new_fallbacks = 0, NULL, (new_errors + new_fallbacks) / (new_seen + new_fallbacks)) AS new_error_rate,
    new_fallbacks,
    if(legacy_seen = 0, NULL, legacy_p99_us / 1000) AS legacy_p99_ms,
    if(new_seen = 0, NULL, new_p99_us / 1000) AS new_p99_ms,
    diff_match,
    diff_mismatch,
    if(diff_match + diff_mismatch = 0, NULL, diff_match / (diff_match + diff_mismatch)) AS match_rate
FROM
(
    SELECT
        route,
        sumIf(requests, backend = 'legacy' AND shadow = 0) AS legacy_requests,
        sumIf(requests, backend = 'new' AND shadow = 0) AS new_requests,
        sumIf(requests, backend = 'legacy') AS legacy_seen,
        sumIf(requests, backend = 'new') AS new_seen,
        sumIf(errors, backend = 'legacy') AS legacy_errors,
        sumIf(errors, backend = 'new') AS new_errors,
        quantileExactWeightedIf(0.99)(exp2((bucket + 0.5) / 32), hits, hits > 0 AND backend = 'legacy') AS legacy_p99_us,
        quantileExactWeightedIf(0.99)(exp2((bucket + 0.5) / 32), hits, hits > 0 AND backend = 'new') AS new_p99_us,
        sum(diff_match) AS diff_match,
        sum(diff_mismatch) AS diff_mismatch,
        sumIf(requests, fallback = 1) AS new_fallbacks
    FROM ${database}.route_stats
    WHERE route != '' AND $__timeFilter(time)
    GROUP BY route
) AS counts
ANY LEFT JOIN
(
    SELECT route, argMax(to_state, at_ns) AS state
    FROM ${database}.route_events
    GROUP BY route
) AS states USING (route)
ORDER BY route
