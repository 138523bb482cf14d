-- The JSON paths that differed between the two sides, most frequent first. Array
-- positions are collapsed (`/0/total`, `/1/total` -> `/*/total`) and a path counts
-- once per pair; the samples keep the real positions.
SELECT
    path,
    uniqExact(trace_id, span_id) AS mismatches
FROM
(
    SELECT
        trace_id,
        span_id,
        -- `/0/1/x/` -> `/*/*/x/` needs two passes (a match consumes its closing slash).
        replaceRegexpOne(
            replaceRegexpAll(replaceRegexpAll(concat(raw, '/'), '/[0-9]+/', '/*/'), '/[0-9]+/', '/*/'),
            '/\\z', '') AS path
    FROM ${database}.spans
    ARRAY JOIN splitByChar(',', diff_paths) AS raw
    WHERE route = '${route}' AND diff = 'mismatch' AND raw != '' AND $__timeFilter(start_time)
)
GROUP BY path
ORDER BY mismatches DESC, path
LIMIT 20
