-- Requests per route and time bucket (the overview's sparklines).
SELECT
    toDateTime(intDiv(toUInt32(minute), $__interval_s) * $__interval_s, 'UTC') AS time,
    route,
    countMerge(requests) AS requests
FROM ${database}.route_minute
WHERE $__timeFilter(minute) AND shadow = 0
GROUP BY time, route
ORDER BY time, route
