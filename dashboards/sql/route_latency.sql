-- p50/p95/p99 latency of each side in milliseconds, shadow copies included, read
-- from the router's latency buckets (within 1.1 % of the exact value).
SELECT
    toDateTime(intDiv(toUInt32(time), $__interval_s) * $__interval_s, 'UTC') AS time,
    if(sumIf(hits, backend = 'legacy') = 0, NULL, quantilesExactWeightedIf(0.5, 0.95, 0.99)(exp2((bucket + 0.5) / 32), hits, hits > 0 AND backend = 'legacy')[1] / 1000) AS legacy_p50_ms,
    if(sumIf(hits, backend = 'legacy') = 0, NULL, quantilesExactWeightedIf(0.5, 0.95, 0.99)(exp2((bucket + 0.5) / 32), hits, hits > 0 AND backend = 'legacy')[2] / 1000) AS legacy_p95_ms,
    if(sumIf(hits, backend = 'legacy') = 0, NULL, quantilesExactWeightedIf(0.5, 0.95, 0.99)(exp2((bucket + 0.5) / 32), hits, hits > 0 AND backend = 'legacy')[3] / 1000) AS legacy_p99_ms,
    if(sumIf(hits, backend = 'new') = 0, NULL, quantilesExactWeightedIf(0.5, 0.95, 0.99)(exp2((bucket + 0.5) / 32), hits, hits > 0 AND backend = 'new')[1] / 1000) AS new_p50_ms,
    if(sumIf(hits, backend = 'new') = 0, NULL, quantilesExactWeightedIf(0.5, 0.95, 0.99)(exp2((bucket + 0.5) / 32), hits, hits > 0 AND backend = 'new')[2] / 1000) AS new_p95_ms,
    if(sumIf(hits, backend = 'new') = 0, NULL, quantilesExactWeightedIf(0.5, 0.95, 0.99)(exp2((bucket + 0.5) / 32), hits, hits > 0 AND backend = 'new')[3] / 1000) AS new_p99_ms
FROM ${database}.route_stats
WHERE route = '${route}' AND $__timeFilter(time)
GROUP BY time
HAVING sum(hits) > 0
ORDER BY time
