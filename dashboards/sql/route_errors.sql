-- Share of each side's answers that were errors (5xx or failed), shadow copies included.
SELECT
    time,
    if(legacy_n = 0, NULL, legacy_e / legacy_n) AS legacy_error_rate,
    if(new_n = 0, NULL, new_e / new_n) AS new_error_rate
FROM
(
    SELECT
        toDateTime(intDiv(toUInt32(minute), $__interval_s) * $__interval_s, 'UTC') AS time,
        countMergeIf(requests, backend = 'legacy') AS legacy_n,
        countMergeIf(requests, backend = 'new') AS new_n,
        sumMergeIf(errors, backend = 'legacy') AS legacy_e,
        sumMergeIf(errors, backend = 'new') AS new_e
    FROM ${database}.route_minute
    WHERE route = '${route}' AND $__timeFilter(minute)
    GROUP BY time
)
ORDER BY time
