-- Every route seen in traffic or in a recorded change (the route selector).
SELECT DISTINCT route
FROM
(
    SELECT DISTINCT route FROM ${database}.route_stats
    UNION ALL
    SELECT route FROM ${database}.route_events
)
WHERE route != ''
ORDER BY route
