-- The JSON paths that differed between the two sides, most frequent first.
SELECT
    path,
    count() AS mismatches
FROM ${database}.spans
ARRAY JOIN splitByChar(',', diff_paths) AS path
WHERE route = '${route}' AND diff = 'mismatch' AND path != '' AND $__timeFilter(start_time)
GROUP BY path
ORDER BY mismatches DESC, path
LIMIT 20
