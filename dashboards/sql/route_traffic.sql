-- Requests per second served by each side, and shadow copies sent.
SELECT
    toDateTime(intDiv(toUInt32(time), $__interval_s) * $__interval_s, 'UTC') AS time,
    sumIf(requests, backend = 'legacy' AND shadow = 0) / $__interval_s AS legacy_rps,
    sumIf(requests, backend = 'new' AND shadow = 0) / $__interval_s AS new_rps,
    sumIf(requests, shadow = 1) / $__interval_s AS shadow_rps
FROM ${database}.route_stats
WHERE route = '${route}' AND $__timeFilter(time)
GROUP BY time
HAVING sum(requests) > 0
ORDER BY time
