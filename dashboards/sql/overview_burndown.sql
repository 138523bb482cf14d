-- The migration burndown: share of all traffic through the router (routed or not)
-- still answered by legacy.
SELECT
    time,
    legacy / (legacy + new) AS legacy_share
FROM
(
    SELECT
        toDateTime(intDiv(toUInt32(minute), $__interval_s) * $__interval_s, 'UTC') AS time,
        countMergeIf(requests, backend = 'legacy') AS legacy,
        countMergeIf(requests, backend = 'new') AS new
    FROM ${database}.traffic_minute
    WHERE $__timeFilter(minute)
    GROUP BY time
)
WHERE legacy + new > 0
ORDER BY time
