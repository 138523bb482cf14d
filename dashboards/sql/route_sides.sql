-- The window's totals per side, primary and shadow separately.
SELECT
    backend,
    shadow,
    countMerge(requests) AS requests,
    sumMerge(errors) AS errors,
    quantilesMerge(0.5, 0.95, 0.99)(latency)[1] / 1000000 AS p50_ms,
    quantilesMerge(0.5, 0.95, 0.99)(latency)[2] / 1000000 AS p95_ms,
    quantilesMerge(0.5, 0.95, 0.99)(latency)[3] / 1000000 AS p99_ms,
    sumMerge(diff_match) AS diff_match,
    sumMerge(diff_mismatch) AS diff_mismatch
FROM ${database}.route_minute
WHERE route = '${route}' AND $__timeFilter(minute)
GROUP BY backend, shadow
ORDER BY backend, shadow
