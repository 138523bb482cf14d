-- Every route seen in traffic or in a recorded change (the route selector).
SELECT DISTINCT route
FROM
(
    SELECT route FROM ${database}.route_minute
    UNION ALL
    SELECT route FROM ${database}.route_events
)
WHERE route != ''
ORDER BY route
