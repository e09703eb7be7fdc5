-- Queries of periodic jobs (migration 12). {schema} is the quoted schema name.

-- name: schedules_define
-- A starting worker writes the schedules it defines. A schedule whose expression or time
-- zone changed starts again from its next tick after now; otherwise its next_tick stays, so
-- a tick missed while no worker ran is still enqueued (late, once).
INSERT INTO {schema}.schedules AS s (
    name, cron, timezone, step, queue, args, meta, max_attempts, priority, timeout, tags,
    unique_key, unique_period, unique_states, next_tick, live_until)
SELECT name, cron, timezone, step, queue, args, meta, max_attempts, priority, timeout, tags,
       unique_key, unique_period, unique_states, next_tick,
       now() + make_interval(secs => %(ttl)s)
FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(
    name text, cron text, timezone text, step text, queue text, args jsonb, meta jsonb,
    max_attempts integer, priority smallint, timeout double precision, tags text[],
    unique_key text, unique_period double precision, unique_states text[],
    next_tick timestamptz)
ORDER BY name
ON CONFLICT (name) DO UPDATE
SET next_tick = CASE WHEN (s.cron, s.timezone) = (EXCLUDED.cron, EXCLUDED.timezone)
                     THEN s.next_tick ELSE EXCLUDED.next_tick END,
    defined_at = CASE WHEN (s.cron, s.timezone) = (EXCLUDED.cron, EXCLUDED.timezone)
                      THEN s.defined_at ELSE now() END,
    cron = EXCLUDED.cron,
    timezone = EXCLUDED.timezone,
    step = EXCLUDED.step,
    queue = EXCLUDED.queue,
    args = EXCLUDED.args,
    meta = EXCLUDED.meta,
    max_attempts = EXCLUDED.max_attempts,
    priority = EXCLUDED.priority,
    timeout = EXCLUDED.timeout,
    tags = EXCLUDED.tags,
    unique_key = EXCLUDED.unique_key,
    unique_period = EXCLUDED.unique_period,
    unique_states = EXCLUDED.unique_states,
    seen_at = now(),
    live_until = GREATEST(s.live_until, EXCLUDED.live_until)
RETURNING name, cron, timezone, next_tick, xmax = 0 AS created, defined_at = now() AS changed

-- name: schedules_seen
-- A live worker renews the schedules it defines.
UPDATE {schema}.schedules
SET seen_at = now(),
    live_until = GREATEST(live_until, now() + make_interval(secs => %(ttl)s))
WHERE name = ANY(%(names)s::text[])

-- name: schedules_live
-- The leader's read: schedules a live worker defines, and the time (now, unless given).
SELECT name, cron, timezone, next_tick, COALESCE(%(now)s::timestamptz, now()) AS now
FROM {schema}.schedules
WHERE live_until > now()
ORDER BY name

-- name: schedule_tick
-- Enqueue one tick: move next_tick on from the value the leader read (a compare-and-set
-- that fails once any leader did it) and insert the job, in one statement. No row back:
-- another leader did it. A row without an id: the job is unique and its key is held (its
-- full key as jobs_insert_unique builds it, the period counted on the server's clock).
WITH ticked AS (
    UPDATE {schema}.schedules AS s
    SET last_tick = %(tick)s,
        next_tick = %(following)s,
        ticked_at = now()
    WHERE s.name = %(name)s
      AND s.next_tick = %(expected)s
      AND s.cron = %(cron)s
      AND s.timezone = %(timezone)s
    RETURNING s.step, s.queue, s.args, s.meta, s.max_attempts, s.priority, s.timeout, s.tags,
              CASE WHEN s.unique_period IS NULL THEN s.unique_key
                   ELSE s.unique_key || ':' || floor(extract(epoch FROM now())
                        / s.unique_period)::bigint::text
              END AS unique_key,
              s.unique_states
), inserted AS (
    INSERT INTO {schema}.jobs (state, queue, step, args, meta, max_attempts, priority,
                               timeout, tags, unique_key, unique_states)
    SELECT 'available', queue, step, args, meta || %(meta)s::jsonb, max_attempts, priority,
           timeout, tags, unique_key, unique_states
    FROM ticked
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state = ANY(unique_states)
    DO NOTHING
    RETURNING id, queue
)
SELECT i.id, t.queue, t.unique_key,
       CASE WHEN i.id IS NOT NULL THEN pg_notify(%(channel)s, i.queue) END
FROM ticked AS t
LEFT JOIN inserted AS i ON true

-- name: schedule_job_note
-- Name the job of the tick just enqueued (in the tick's transaction).
UPDATE {schema}.schedules SET last_job_id = %(job_id)s WHERE name = %(name)s

-- name: schedules_list
-- Every schedule, for `baton status` and app.query.schedules().
SELECT name, cron, timezone, step, queue, next_tick, last_tick, last_job_id, ticked_at,
       defined_at, seen_at, live_until > now() AS live
FROM {schema}.schedules
ORDER BY name
