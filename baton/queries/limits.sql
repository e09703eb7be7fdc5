-- Queue limits (migration 14): their settings, and the limited fetch that enforces them.

-- name: queue_limit_set
-- Set every limit of a queue (a NULL is no such limit), tell the workers on the control
-- channel and wake the queue's producers; both notifications go out on commit. The
-- queue's recorded starts are kept: a new rate counts the starts already in its window.
WITH saved AS (
    INSERT INTO {schema}.queue_limits AS l (
        queue, concurrency, total_concurrency, rate_limit, rate_period, token_limit,
        token_period, partition_by)
    VALUES (%(queue)s, %(concurrency)s, %(total_concurrency)s, %(rate_limit)s,
            %(rate_period)s, %(token_limit)s, %(token_period)s, %(partition_by)s)
    ON CONFLICT (queue) DO UPDATE
    SET concurrency = EXCLUDED.concurrency, total_concurrency = EXCLUDED.total_concurrency,
        rate_limit = EXCLUDED.rate_limit,
        rate_period = EXCLUDED.rate_period, token_limit = EXCLUDED.token_limit,
        token_period = EXCLUDED.token_period, partition_by = EXCLUDED.partition_by,
        updated_at = now()
    RETURNING queue, concurrency, total_concurrency, rate_limit, rate_period, token_limit,
        token_period, partition_by, updated_at
), told AS (
    SELECT pg_notify(%(control)s, json_build_object('action', 'limits', 'queue', queue)::text),
        pg_notify(%(insert)s, queue)
    FROM saved
)
SELECT queue, concurrency, total_concurrency, rate_limit, rate_period, token_limit,
    token_period, partition_by, updated_at, (SELECT count(*) FROM told) AS told
FROM saved

-- name: queue_limit_remove
-- Remove a queue's limits and its recorded starts, tell the workers and wake the queue's
-- producers. Returns the queue when it had limits.
WITH removed AS (
    DELETE FROM {schema}.queue_limits WHERE queue = %(queue)s RETURNING queue
), forgotten AS (
    DELETE FROM {schema}.queue_limit_starts WHERE queue = %(queue)s
), told AS (
    SELECT pg_notify(%(control)s, json_build_object('action', 'limits', 'queue', queue)::text),
        pg_notify(%(insert)s, queue)
    FROM removed
)
SELECT queue, (SELECT count(*) FROM told) AS told FROM removed

-- name: queue_limits_list
-- The limits of the queues named in %(queues)s, or of every limited queue when it is NULL.
SELECT queue, concurrency, total_concurrency, rate_limit, rate_period, token_limit,
    token_period, partition_by, updated_at
FROM {schema}.queue_limits
WHERE %(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[])
ORDER BY queue

-- name: queue_limit_lock
-- The first statement of a limited claim's transaction: limited claims of one queue take
-- turns on its limits row. The claim is a statement of its own after this one, so it reads
-- what the claim before it committed (a lock taken inside the claim statement would leave
-- it reading a snapshot from before the lock was granted, blind to the jobs just started).
SELECT queue FROM {schema}.queue_limits WHERE queue = %(queue)s FOR UPDATE

-- name: jobs_fetch_limited
-- Claim up to %(demand)s available jobs of a limited queue (after queue_limit_lock, in its
-- transaction). Each partition (the whole queue when unpartitioned) may start as many jobs
-- as its concurrency, rate and token limits leave room for; partitions with no room are
-- skipped in the scan, so a busy one never hides the others' jobs, and the jobs picked take
-- turns between partitions (the first of each, then the second, ...), up to the room
-- total_concurrency leaves in the whole queue. %(scan)s bounds the
-- jobs considered. Times are the statement's: it starts after the lock was granted, so
-- every claim's starts are later than the ones before it. The last column of every row is
-- the seconds until a partition at its rate or token limit gains room (0 when the scan of a
-- partitioned queue was cut short: fetch again, now that more partitions are full; NULL
-- when none waits on a window); when nothing is claimed, one row carries it
-- with every other column NULL. (The writes in counted and forgotten run whether or not the
-- final SELECT reads them.)
WITH lim AS (
    SELECT concurrency, total_concurrency, rate_limit, rate_period, token_limit, token_period,
        partition_by, statement_timestamp() AS now
    FROM {schema}.queue_limits
    WHERE queue = %(queue)s
), running AS (
    SELECT CASE WHEN lim.partition_by IS NULL THEN ''
                ELSE COALESCE(j.args ->> lim.partition_by, '') END AS part,
        count(*) AS jobs
    FROM lim, {schema}.jobs AS j
    WHERE (lim.concurrency IS NOT NULL OR lim.total_concurrency IS NOT NULL)
      AND j.state = 'executing' AND j.queue = %(queue)s
    GROUP BY 1
), started AS (
    SELECT s.partition_key AS part, sum(s.jobs) AS jobs, min(s.started_at) AS oldest
    FROM lim, {schema}.queue_limit_starts AS s
    WHERE lim.rate_limit IS NOT NULL AND s.queue = %(queue)s
      AND s.started_at > lim.now - make_interval(secs => lim.rate_period)
    GROUP BY 1
), spent AS (
    SELECT CASE WHEN lim.partition_by IS NULL THEN ''
                ELSE COALESCE(j.args ->> lim.partition_by, '') END AS part,
        sum(st.input_tokens + st.output_tokens) AS tokens, min(st.inserted_at) AS oldest
    FROM lim, {schema}.step_stats AS st
    JOIN {schema}.jobs AS j ON j.id = st.job_id
    WHERE lim.token_limit IS NOT NULL
      AND st.inserted_at > lim.now - make_interval(secs => lim.token_period)
      AND j.queue = %(queue)s
    GROUP BY 1
), room AS (
    SELECT p.part, LEAST(lim.concurrency - COALESCE(r.jobs, 0),
                         lim.rate_limit - COALESCE(s.jobs, 0),
                         CASE WHEN t.tokens >= lim.token_limit THEN 0 END) AS jobs
    FROM (SELECT part FROM running UNION SELECT part FROM started UNION SELECT part FROM spent
         ) AS p
    CROSS JOIN lim
    LEFT JOIN running AS r ON r.part = p.part
    LEFT JOIN started AS s ON s.part = p.part
    LEFT JOIN spent AS t ON t.part = p.part
), candidates AS MATERIALIZED (
    SELECT j.id, j.priority, j.scheduled_at,
        CASE WHEN lim.partition_by IS NULL THEN ''
             ELSE COALESCE(j.args ->> lim.partition_by, '') END AS part
    FROM lim, {schema}.jobs AS j
    WHERE j.state = 'available' AND j.queue = %(queue)s AND j.scheduled_at <= lim.now
      AND j.step = ANY(%(steps)s::text[])
      AND CASE WHEN lim.partition_by IS NULL THEN ''
               ELSE COALESCE(j.args ->> lim.partition_by, '') END
          <> ALL(ARRAY(SELECT part FROM room WHERE jobs <= 0))
    ORDER BY j.priority, j.scheduled_at, j.id
    LIMIT %(scan)s
), picked AS MATERIALIZED (
    SELECT c.id, c.part
    FROM (SELECT id, priority, scheduled_at, part,
                 row_number() OVER (PARTITION BY part ORDER BY priority, scheduled_at, id) AS turn
          FROM candidates) AS c
    CROSS JOIN lim
    LEFT JOIN room AS r ON r.part = c.part
    WHERE c.turn <= COALESCE(r.jobs, LEAST(lim.concurrency, lim.rate_limit), %(demand)s)
    ORDER BY c.turn, c.priority, c.scheduled_at, c.id
    -- The whole queue's room, when it has a total_concurrency.
    LIMIT (SELECT CASE WHEN lim.total_concurrency IS NULL THEN %(demand)s
                       ELSE LEAST(%(demand)s, GREATEST(0, lim.total_concurrency - (
                           SELECT COALESCE(sum(jobs), 0) FROM running))) END
           FROM lim)
), claimed AS (
    -- No row lock in the scan: limited claims of the queue take turns, and a job another
    -- transaction changed meanwhile (a cancel) fails the state check here and is skipped.
    UPDATE {schema}.jobs AS j
    SET state = 'executing',
        attempt = j.attempt + 1,
        attempted_at = lim.now,
        attempted_by = %(worker_id)s
    FROM picked, lim
    WHERE j.id = picked.id AND j.state = 'available'
    RETURNING j.id, j.step, j.args, NULLIF(j.meta, '{}'::jsonb) AS meta, j.queue, j.attempt,
        j.max_attempts, j.snoozes, j.priority, j.timeout, j.workflow_id, j.workflow_step,
        picked.part
), claimed_parts AS (
    SELECT part, count(*) AS jobs FROM claimed GROUP BY part
), counted AS (
    INSERT INTO {schema}.queue_limit_starts (queue, partition_key, started_at, jobs)
    SELECT %(queue)s, c.part, lim.now, c.jobs
    FROM claimed_parts AS c, lim
    WHERE lim.rate_limit IS NOT NULL
), forgotten AS (
    DELETE FROM {schema}.queue_limit_starts AS s
    USING lim
    WHERE s.queue = %(queue)s
      AND (lim.rate_limit IS NULL
           OR s.started_at <= lim.now - make_interval(secs => lim.rate_period))
), waits AS (
    SELECT min(w.seconds) AS seconds
    FROM (
        SELECT EXTRACT(EPOCH FROM COALESCE(s.oldest, lim.now)
                       + make_interval(secs => lim.rate_period) - lim.now)
        FROM (SELECT part FROM started UNION SELECT part FROM claimed_parts) AS p
        CROSS JOIN lim
        LEFT JOIN started AS s ON s.part = p.part
        LEFT JOIN claimed_parts AS c ON c.part = p.part
        WHERE COALESCE(s.jobs, 0) + COALESCE(c.jobs, 0) >= lim.rate_limit
        UNION ALL
        SELECT EXTRACT(EPOCH FROM t.oldest + make_interval(secs => lim.token_period) - lim.now)
        FROM spent AS t, lim
        WHERE t.tokens >= lim.token_limit
        UNION ALL
        SELECT 0
        FROM lim
        WHERE lim.partition_by IS NOT NULL AND (SELECT count(*) FROM candidates) >= %(scan)s
          AND (SELECT count(*) FROM claimed) < %(demand)s
    ) AS w(seconds)
)
SELECT c.id, c.step, c.args, c.meta, c.queue, c.attempt, c.max_attempts, c.snoozes,
    c.priority, c.timeout, c.workflow_id, c.workflow_step,
    w.seconds::double precision
FROM waits AS w
LEFT JOIN claimed AS c ON true
