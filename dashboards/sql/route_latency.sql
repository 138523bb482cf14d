-- p50/p95/p99 latency of each side in milliseconds, shadow copies included.
SELECT
    time,
    if(countIf(backend = 'legacy') = 0, NULL, maxIf(q[1], backend = 'legacy') / 1000000) AS legacy_p50_ms,
    if(countIf(backend = 'legacy') = 0, NULL, maxIf(q[2], backend = 'legacy') / 1000000) AS legacy_p95_ms,
    if(countIf(backend = 'legacy') = 0, NULL, maxIf(q[3], backend = 'legacy') / 1000000) AS legacy_p99_ms,
    if(countIf(backend = 'new') = 0, NULL, maxIf(q[1], backend = 'new') / 1000000) AS new_p50_ms,
    if(countIf(backend = 'new') = 0, NULL, maxIf(q[2], backend = 'new') / 1000000) AS new_p95_ms,
    if(countIf(backend = 'new') = 0, NULL, maxIf(q[3], backend = 'new') / 1000000) AS new_p99_ms
FROM
(
    SELECT
        toDateTime(intDiv(toUInt32(minute), $__interval_s) * $__interval_s, 'UTC') AS time,
        backend,
        quantilesMerge(0.5, 0.95, 0.99)(latency) AS q
    FROM ${database}.route_minute
    WHERE route = '${route}' AND $__timeFilter(minute)
    GROUP BY time, backend
)
GROUP BY time
ORDER BY time
