-- The window's totals per side, primary and shadow separately: exact counts and
-- percentiles from the router's latency buckets (within 1.1 %).
SELECT
    backend,
    shadow,
    sum(requests) AS requests,
    sum(errors) AS errors,
    quantilesExactWeightedIf(0.5, 0.95, 0.99)(exp2((bucket + 0.5) / 32), hits, hits > 0)[1] / 1000 AS p50_ms,
    quantilesExactWeightedIf(0.5, 0.95, 0.99)(exp2((bucket + 0.5) / 32), hits, hits > 0)[2] / 1000 AS p95_ms,
    quantilesExactWeightedIf(0.5, 0.95, 0.99)(exp2((bucket + 0.5) / 32), hits, hits > 0)[3] / 1000 AS p99_ms,
    sum(diff_match) AS diff_match,
    sum(diff_mismatch) AS diff_mismatch
FROM ${database}.route_stats
WHERE route = '${route}' AND $__timeFilter(time)
GROUP BY backend, shadow
HAVING requests + diff_match + diff_mismatch > 0
ORDER BY backend, shadow
