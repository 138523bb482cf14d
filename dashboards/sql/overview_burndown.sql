-- The migration burndown: share of all traffic through the router (routed or not)
-- still answered by legacy.
SELECT
    time,
    legacy / (legacy + new) AS legacy_share
FROM
(
    SELECT
        toDateTime(intDiv(toUInt32(time), $__interval_s) * $__interval_s, 'UTC') AS time,
        sumIf(requests, backend = 'legacy' AND shadow = 0) AS legacy,
        sumIf(requests, backend = 'new' AND shadow = 0) AS new
    FROM ${database}.route_stats
    WHERE $__timeFilter(time)
    GROUP BY time
)
WHERE legacy + new > 0
ORDER BY time
