-- A rollout step's evidence per side, served and shadow copies separately: exact
-- counts and p99 from the spans themselves (to the second, unlike the per-minute
-- aggregates), so a step's window starts exactly at its flip. A request the router
-- gave the new side but served from legacy after the new side failed (decision
-- 'fallback') counts as a failure of the new side: that is what it was.
SELECT
    if(decision = 'fallback', 'new', backend) AS side,
    shadow,
    count() AS requests,
    sum(http_status >= 500 OR status_code = 'error' OR decision = 'fallback') AS errors,
    sum(decision = 'fallback') AS fallbacks,
    quantile(0.99)(duration_ns) / 1000000 AS p99_ms,
    sum(diff = 'match') AS diff_match,
    sum(diff = 'mismatch') AS diff_mismatch
FROM ${database}.spans
WHERE route = '${route}' AND $__timeFilter(start_time) AND (kind = 'server' OR shadow = 1)
GROUP BY side, shadow
ORDER BY side, shadow
