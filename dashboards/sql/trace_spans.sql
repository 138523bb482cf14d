-- One trace's spans, oldest first (the waterfall). The trace index limits the scan to
-- the days the trace has spans in.
SELECT
    span_id,
    any(parent_span_id) AS parent_span_id,
    any(name) AS name,
    any(service) AS service,
    any(kind) AS kind,
    min(start_time_ns) AS start_ns,
    any(duration_ns) AS duration_ns,
    any(status_code) AS status_code,
    any(http_status) AS http_status,
    any(route) AS route,
    any(backend) AS backend,
    any(shadow) AS shadow,
    any(diff) AS diff
FROM ${database}.spans
WHERE trace_id = '${trace_id}'
    AND toDate(start_time) GLOBAL IN (SELECT day FROM ${database}.trace_index WHERE trace_id = '${trace_id}')
GROUP BY span_id
ORDER BY start_ns
