-- Which route next? The traffic legacy still serves (no route matched, or a route
-- still on legacy), its request paths grouped into templates: whole segments of
-- digits become {id}, UUIDs {uuid}, hex strings of 16+ characters {hash}. Per
-- template: methods, requests, share of all legacy traffic, errors, p50/p99, and
-- the routes that already cover it. Feeds `strangler routes suggest`. Read from
-- the spans drawn at random (a router at sample_ratio 0.01 keeps 1 %; spans kept
-- for their outcome, strangler.sampled = outcome, are left out, or errors and slow
-- requests would be over-represented): shares, error rates and percentiles are
-- estimates, requests are the sample's.
SELECT
    template,
    arrayStringConcat(arraySort(groupUniqArray(http_method)), ',') AS methods,
    count() AS requests,
    count() / (
        SELECT count()
        FROM ${database}.spans
        WHERE kind = 'server' AND shadow = 0 AND backend = 'legacy'
            AND indexOf(attr_keys, 'url.path') > 0 AND indexOf(attr_keys, 'strangler.sampled') = 0
            AND $__timeFilter(start_time)
    ) AS share,
    countIf(status_code = 'error' OR http_status >= 500) AS errors,
    quantileExact(0.5)(duration_ns) / 1000000 AS p50_ms,
    quantileExact(0.99)(duration_ns) / 1000000 AS p99_ms,
    arrayStringConcat(arraySort(arrayFilter(r -> r != '', groupUniqArray(route))), ',') AS routes
FROM
(
    SELECT
        http_method,
        http_status,
        status_code,
        duration_ns,
        route,
        -- Two passes per kind: a match consumes the slash that closes its segment.
        replaceRegexpOne(
            replaceRegexpAll(replaceRegexpAll(
                replaceRegexpAll(replaceRegexpAll(
                    replaceRegexpAll(replaceRegexpAll(
                        concat(attr_values[indexOf(attr_keys, 'url.path')], '/'),
                        '/[0-9]+/', '/{id}/'), '/[0-9]+/', '/{id}/'),
                    '/[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}/', '/{uuid}/'),
                    '/[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}/', '/{uuid}/'),
                '/[0-9a-fA-F]{16,}/', '/{hash}/'), '/[0-9a-fA-F]{16,}/', '/{hash}/'),
            '(.)/\\z', '\\1') AS template
    FROM ${database}.spans
    WHERE kind = 'server' AND shadow = 0 AND backend = 'legacy'
        AND indexOf(attr_keys, 'url.path') > 0 AND indexOf(attr_keys, 'strangler.sampled') = 0
        AND $__timeFilter(start_time)
)
GROUP BY template
ORDER BY requests DESC, template
LIMIT 50
