-- Requests per route and time bucket (the overview's sparklines).
SELECT
    toDateTime(intDiv(toUInt32(time), $__interval_s) * $__interval_s, 'UTC') AS time,
    route,
    sum(requests) AS requests
FROM ${database}.route_stats
WHERE route != '' AND shadow = 0 AND $__timeFilter(time)
GROUP BY time, route
HAVING requests > 0
ORDER BY time, route
