-- Recent mismatching pairs with both answers, newest first.
SELECT
    toDateTime(start_time, 'UTC') AS time,
    trace_id,
    pair_id,
    diff_paths,
    visitParamExtractString(events_json, 'request') AS request,
    visitParamExtractInt(events_json, 'primary.status') AS primary_status,
    visitParamExtractString(events_json, 'primary.body') AS primary_body,
    visitParamExtractInt(events_json, 'shadow.status') AS shadow_status,
    visitParamExtractString(events_json, 'shadow.body') AS shadow_body,
    visitParamExtractString(events_json, 'differences') AS differences,
    backend AS primary_backend
FROM ${database}.spans
WHERE route = '${route}' AND diff = 'mismatch' AND $__timeFilter(start_time)
ORDER BY start_time DESC, trace_id
LIMIT 10
