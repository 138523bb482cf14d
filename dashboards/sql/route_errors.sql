-- Share of each side's answers that were errors (5xx or failed), shadow copies
-- included. The new side's failures include fallbacks: requests it was given and
-- failed, which legacy then answered (counted as legacy answers too).
SELECT
    toDateTime(intDiv(toUInt32(time), $__interval_s) * $__interval_s, 'UTC') AS time,
    if(sumIf(requests, backend = 'legacy') = 0, NULL,
        sumIf(errors, backend = 'legacy') / sumIf(requests, backend = 'legacy')) AS legacy_error_rate,
    if(sumIf(requests, backend = 'new') + sumIf(requests, fallback = 1) = 0, NULL,
        (sumIf(errors, backend = 'new') + sumIf(requests, fallback = 1))
            / (sumIf(requests, backend = 'new') + sumIf(requests, fallback = 1))) AS new_error_rate
FROM ${database}.route_stats
WHERE route = '${route}' AND $__timeFilter(time)
GROUP BY time
HAVING sum(requests) > 0
ORDER BY time
