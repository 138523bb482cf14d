-- A rollout step's evidence per side, served and shadow copies separately: exact
-- counts, to the second (a router's aggregates count from the start of the interval
-- they cover, so the first interval after a flip, which began before it, is left
-- out rather than mixed in), and p99 from the latency buckets. A request the router
-- gave the new side but served from legacy after the new side failed (a fallback)
-- counts as a failure of the new side: that is what it was.
SELECT
    side,
    shadow,
    n AS requests,
    toUInt64(e + f) AS errors,
    f AS fallbacks,
    p99_ms,
    dm AS diff_match,
    dx AS diff_mismatch
FROM
(
    SELECT
        if(fallback = 1, 'new', backend) AS side,
        shadow,
        sum(requests) AS n,
        sumIf(errors, fallback = 0) AS e,
        sumIf(requests, fallback = 1) AS f,
        quantileExactWeightedIf(0.99)(exp2((bucket + 0.5) / 32), hits, hits > 0) / 1000 AS p99_ms,
        sum(diff_match) AS dm,
        sum(diff_mismatch) AS dx
    FROM ${database}.route_stats
    WHERE route = '${route}' AND $__timeFilter(time)
    GROUP BY side, shadow
)
WHERE n + dm + dx > 0
ORDER BY side, shadow
