-- Every route over the window: lifecycle state, traffic per side, error rate and
-- p99 for both sides, shadow match rate. The new side's error rate includes
-- fallbacks (requests it failed that legacy then answered).
SELECT
    route,
    state,
    legacy_requests,
    new_requests,
    if(legacy_requests + new_requests = 0, NULL, new_requests / (legacy_requests + new_requests)) AS new_share,
    if(legacy_seen = 0, NULL, legacy_errors / legacy_seen) AS legacy_error_rate,
    if(new_seen + new_fallbacks = 0, NULL, (new_errors + new_fallbacks) / (new_seen + new_fallbacks)) AS new_error_rate,
    new_fallbacks,
    if(legacy_seen = 0, NULL, legacy_p99_ns / 1000000) AS legacy_p99_ms,
    if(new_seen = 0, NULL, new_p99_ns / 1000000) AS new_p99_ms,
    diff_match,
    diff_mismatch,
    if(diff_match + diff_mismatch = 0, NULL, diff_match / (diff_match + diff_mismatch)) AS match_rate
FROM
(
    SELECT
        route,
        sumIf(n, backend = 'legacy' AND shadow = 0) AS legacy_requests,
        sumIf(n, backend = 'new' AND shadow = 0) AS new_requests,
        sumIf(n, backend = 'legacy') AS legacy_seen,
        sumIf(n, backend = 'new') AS new_seen,
        sumIf(e, backend = 'legacy') AS legacy_errors,
        sumIf(e, backend = 'new') AS new_errors,
        maxIf(q[3], backend = 'legacy') AS legacy_p99_ns,
        maxIf(q[3], backend = 'new') AS new_p99_ns,
        sum(dm) AS diff_match,
        sum(dx) AS diff_mismatch,
        sumIf(n, backend = 'fallback') AS new_fallbacks
    FROM
    (
        SELECT
            route,
            backend,
            shadow,
            countMerge(requests) AS n,
            sumMerge(errors) AS e,
            quantilesMerge(0.5, 0.95, 0.99)(latency) AS q,
            sumMerge(diff_match) AS dm,
            sumMerge(diff_mismatch) AS dx
        FROM ${database}.route_minute
        WHERE $__timeFilter(minute)
        GROUP BY route, backend, shadow
        UNION ALL
        SELECT
            route,
            'fallback',
            toUInt8(0),
            countMerge(fallbacks),
            toUInt64(0),
            emptyArrayFloat64(),
            toUInt64(0),
            toUInt64(0)
        FROM ${database}.fallback_minute
        WHERE $__timeFilter(minute)
        GROUP BY route
    )
    GROUP BY route
)
ANY LEFT JOIN
(
    SELECT route, argMax(to_state, at_ns) AS state
    FROM ${database}.route_events
    GROUP BY route
) USING (route)
ORDER BY route
