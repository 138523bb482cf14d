-- Share of each side's answers that were errors (5xx or failed), shadow copies
-- included. The new side's failures include fallbacks: requests it was given and
-- failed, which legacy then answered (in route_minute they count as legacy).
SELECT
    time,
    if(legacy_n = 0, NULL, legacy_e / legacy_n) AS legacy_error_rate,
    if(new_n + fb = 0, NULL, (new_e + fb) / (new_n + fb)) AS new_error_rate
FROM
(
    SELECT
        time,
        sum(legacy_n) AS legacy_n,
        sum(new_n) AS new_n,
        sum(legacy_e) AS legacy_e,
        sum(new_e) AS new_e,
        sum(fb) AS fb
    FROM
    (
        SELECT
            toDateTime(intDiv(toUInt32(minute), $__interval_s) * $__interval_s, 'UTC') AS time,
            countMergeIf(requests, backend = 'legacy') AS legacy_n,
            countMergeIf(requests, backend = 'new') AS new_n,
            sumMergeIf(errors, backend = 'legacy') AS legacy_e,
            sumMergeIf(errors, backend = 'new') AS new_e,
            toUInt64(0) AS fb
        FROM ${database}.route_minute
        WHERE route = '${route}' AND $__timeFilter(minute)
        GROUP BY time
        UNION ALL
        SELECT
            toDateTime(intDiv(toUInt32(minute), $__interval_s) * $__interval_s, 'UTC') AS time,
            toUInt64(0),
            toUInt64(0),
            toUInt64(0),
            toUInt64(0),
            countMerge(fallbacks)
        FROM ${database}.fallback_minute
        WHERE route = '${route}' AND $__timeFilter(minute)
        GROUP BY time
    )
    GROUP BY time
)
ORDER BY time
