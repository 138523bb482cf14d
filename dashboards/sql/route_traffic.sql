-- Requests per second served by each side, and shadow copies sent.
SELECT
    toDateTime(intDiv(toUInt32(minute), $__interval_s) * $__interval_s, 'UTC') AS time,
    countMergeIf(requests, backend = 'legacy' AND shadow = 0) / $__interval_s AS legacy_rps,
    countMergeIf(requests, backend = 'new' AND shadow = 0) / $__interval_s AS new_rps,
    countMergeIf(requests, shadow = 1) / $__interval_s AS shadow_rps
FROM ${database}.route_minute
WHERE route = '${route}' AND $__timeFilter(minute)
GROUP BY time
ORDER BY time
