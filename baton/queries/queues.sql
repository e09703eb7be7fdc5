-- Queue control: pause, resume and scale queues (migration 13's queues table).

-- name: queue_control_set
-- Change a queue's settings and announce them to every worker on the control channel (the
-- notification goes out when the transaction commits). %(paused)s NULL keeps the pause as
-- it is; %(set_concurrency)s false keeps the concurrency. No row when the queue is unknown:
-- no row of it here, no job, no live worker serving it and not in %(registered)s (the
-- queues of the caller's steps).
WITH known AS (
    SELECT 1
    WHERE %(name)s::text = ANY(%(registered)s::text[])
       OR EXISTS (SELECT 1 FROM {schema}.queues WHERE name = %(name)s::text)
       OR EXISTS (SELECT 1 FROM {schema}.worker_registry
                  WHERE expires_at > now() AND queues ? %(name)s::text)
       OR EXISTS (SELECT 1 FROM {schema}.jobs WHERE queue = %(name)s::text)
), saved AS (
    INSERT INTO {schema}.queues AS q (name, paused, concurrency)
    SELECT %(name)s::text, COALESCE(%(paused)s::boolean, false),
        CASE WHEN %(set_concurrency)s::boolean THEN %(concurrency)s::integer END
    FROM known
    ON CONFLICT (name) DO UPDATE
    SET paused = COALESCE(%(paused)s::boolean, q.paused),
        concurrency = CASE WHEN %(set_concurrency)s::boolean THEN EXCLUDED.concurrency
                           ELSE q.concurrency END,
        version = q.version + 1,
        updated_at = now()
    RETURNING q.name, q.paused, q.concurrency, q.version, q.updated_at
), announced AS (
    SELECT pg_notify(%(channel)s, json_build_object(
        'action', 'queue', 'queue', name, 'paused', paused, 'concurrency', concurrency,
        'version', version)::text)
    FROM saved
)
SELECT name, paused, concurrency, version, updated_at,
    (SELECT count(*) FROM announced) AS announced
FROM saved

-- name: queue_controls_get
-- The settings of the queues a worker serves (a queue without a row runs unpaused, at the
-- worker's own concurrency).
SELECT name, paused, concurrency, version
FROM {schema}.queues
WHERE name = ANY(%(names)s::text[])

-- name: queues_list
-- Every queue that has a setting, jobs or a live worker: its settings, its jobs by state
-- and the live workers serving it, with the concurrency each was started with.
WITH counts AS (
    SELECT queue, jsonb_object_agg(state, jobs) AS counts
    FROM (SELECT queue, state, count(*) AS jobs
          FROM {schema}.jobs GROUP BY queue, state) AS s
    GROUP BY queue
), serving AS (
    SELECT q.key AS queue,
        jsonb_agg(jsonb_build_object('id', w.id, 'concurrency', q.value::integer)
                  ORDER BY w.started_at, w.id) AS workers
    FROM {schema}.worker_registry AS w, jsonb_each_text(w.queues) AS q
    WHERE w.expires_at > now()
    GROUP BY q.key
), names AS (
    SELECT queue FROM counts
    UNION SELECT queue FROM serving
    UNION SELECT name FROM {schema}.queues
)
SELECT n.queue AS name, COALESCE(c.paused, false) AS paused, c.concurrency, c.updated_at,
    COALESCE(k.counts, '{}'::jsonb) AS counts, COALESCE(s.workers, '[]'::jsonb) AS workers
FROM names AS n
LEFT JOIN {schema}.queues AS c ON c.name = n.queue
LEFT JOIN counts AS k ON k.queue = n.queue
LEFT JOIN serving AS s ON s.queue = n.queue
ORDER BY n.queue
