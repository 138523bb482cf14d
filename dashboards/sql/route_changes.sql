-- Lifecycle changes of the route (flips, promotions, rollbacks): the markers.
SELECT
    toDateTime(at, 'UTC') AS time,
    concat(from_state, ' → ', to_state, if(action = to_state, '', concat(' (', action, ')'))) AS text,
    from_state,
    to_state,
    action,
    actor,
    reason
FROM ${database}.route_events
WHERE route = '${route}' AND $__timeFilter(at)
ORDER BY at_ns
