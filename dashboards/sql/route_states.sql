-- Each route's last recorded lifecycle state, also for routes without traffic.
SELECT
    route,
    argMax(to_state, at_ns) AS state,
    toUInt32(max(at)) AS changed_at
FROM ${database}.route_events
GROUP BY route
ORDER BY route
