-- Runtime queries on the queue tables. {schema} is the quoted schema name.

-- name: jobs_insert
-- Insert many jobs in one statement and wake the queues that got available work.
WITH input AS (
    SELECT *
    FROM ROWS FROM (jsonb_to_recordset(%(rows)s::jsonb) AS (
        state text, queue text, step text, args jsonb, meta jsonb, max_attempts integer,
        priority smallint, timeout double precision, scheduled_at timestamptz,
        workflow_id uuid, workflow_step text, tags text[])) WITH ORDINALITY AS t(
        state, queue, step, args, meta, max_attempts, priority, timeout, scheduled_at,
        workflow_id, workflow_step, tags, ord)
), inserted AS (
    INSERT INTO {schema}.jobs (
        state, queue, step, args, meta, max_attempts, priority, timeout, scheduled_at,
        workflow_id, workflow_step, tags)
    SELECT
        CASE WHEN state = 'available' AND scheduled_at > now() THEN 'scheduled' ELSE state END,
        queue, step, args, meta, max_attempts, priority, timeout,
        COALESCE(scheduled_at, now()), workflow_id, workflow_step, COALESCE(tags, '{}')
    FROM input
    ORDER BY ord
    RETURNING id, queue, state
), woken AS (
    SELECT pg_notify(%(channel)s, queue)
    FROM (SELECT DISTINCT queue FROM inserted WHERE state = 'available') AS q
)
SELECT
    COALESCE((SELECT array_agg(id ORDER BY id) FROM inserted), '{}') AS ids,
    (SELECT count(*) FROM woken) AS woken

-- name: job_insert
-- One job: a plain VALUES insert (no JSON to unpack); wakes its queue if it is available.
WITH inserted AS (
    INSERT INTO {schema}.jobs (
        state, queue, step, args, meta, max_attempts, priority, timeout, scheduled_at, tags)
    VALUES (
        CASE WHEN %(scheduled_at)s::timestamptz > now() THEN 'scheduled' ELSE 'available' END,
        %(queue)s, %(step)s, %(args)s::jsonb, %(meta)s::jsonb, %(max_attempts)s,
        %(priority)s, %(timeout)s, COALESCE(%(scheduled_at)s::timestamptz, now()),
        %(tags)s::text[])
    RETURNING id, queue, state
)
SELECT id, CASE WHEN state = 'available' THEN pg_notify(%(channel)s, queue) END
FROM inserted

-- name: job_insert_keyed
-- As job_insert, under an idempotency key (migration 6's unique index): when a job has the
-- key, nothing is inserted and that job's id is returned. No row when that job committed
-- after this statement began (job_get_by_key, a new statement, sees it).
WITH inserted AS (
    INSERT INTO {schema}.jobs (
        state, queue, step, args, meta, max_attempts, priority, timeout, scheduled_at,
        idempotency_key, tags)
    VALUES (
        CASE WHEN %(scheduled_at)s::timestamptz > now() THEN 'scheduled' ELSE 'available' END,
        %(queue)s, %(step)s, %(args)s::jsonb, %(meta)s::jsonb, %(max_attempts)s,
        %(priority)s, %(timeout)s, COALESCE(%(scheduled_at)s::timestamptz, now()),
        %(idempotency_key)s, %(tags)s::text[])
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, queue, state
)
SELECT id, CASE WHEN state = 'available' THEN pg_notify(%(channel)s, queue) END
FROM inserted
UNION ALL
SELECT id, NULL
FROM {schema}.jobs
WHERE idempotency_key = %(idempotency_key)s AND NOT EXISTS (SELECT FROM inserted)

-- name: job_get_by_key
-- The job that has an idempotency key.
SELECT id FROM {schema}.jobs WHERE idempotency_key = %(idempotency_key)s

-- name: jobs_copy_start
-- Before a COPY of many jobs: the time its available jobs are scheduled at, and the last id
-- drawn so far (the COPY draws its ids from the sequence, row by row).
SELECT now(), COALESCE(pg_sequence_last_value('{schema}.jobs_id_seq'::regclass), 0)

-- name: jobs_copied
-- After the COPY, in its transaction: the ids it drew, in order, and a wake-up for the
-- queues that got available jobs. When no other session drew ids meanwhile, they are the
-- %(n)s after %(before)s (jobs_copy_start) and only the first is returned; otherwise they
-- are the rows after %(before)s written by the COPY's transaction.
WITH last AS (
    SELECT currval('{schema}.jobs_id_seq'::regclass) AS id
), woken AS (
    SELECT count(pg_notify(%(channel)s, queue)) AS queues
    FROM unnest(%(queues)s::text[]) AS queue
)
SELECT
    %(before)s::bigint + 1,
    CASE WHEN last.id - %(before)s::bigint = %(n)s THEN NULL ELSE (
        SELECT array_agg(j.id ORDER BY j.id)
        FROM {schema}.jobs AS j
        WHERE j.id > %(before)s::bigint AND j.id <= last.id
          AND j.xmin = (SELECT xmin FROM {schema}.jobs WHERE id = last.id)
    ) END,
    woken.queues
FROM last, woken

-- name: jobs_fetch
-- Claim up to %(demand)s available jobs of one queue for this worker, of the steps it knows
-- (%(steps)s): a job of a step it cannot run stays for a worker that can. The scan starts
-- after the key (%(after_priority)s, %(after_at)s, %(after_id)s) in the fetch order: the
-- last job the worker's previous claim took, or (-1, any time, 0) for the head of the queue.
-- The jobs claimed since the table's last vacuum keep their entries at the head of
-- jobs_fetch_idx; a claim from the head steps over all of them (a 200-job claim read 12
-- index pages on a fresh queue and 1,070 after 175,000 jobs were claimed), one from the
-- last key over none (9 or 10 pages throughout). baton/worker/producer.py says when the
-- worker claims from the head.
WITH picked AS MATERIALIZED (
    SELECT id
    FROM {schema}.jobs
    WHERE state = 'available' AND queue = %(queue)s AND scheduled_at <= now()
      AND step = ANY(%(steps)s::text[])
      AND (priority, scheduled_at, id)
          > (%(after_priority)s::smallint, %(after_at)s::timestamptz, %(after_id)s::bigint)
    ORDER BY priority, scheduled_at, id
    LIMIT %(demand)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.jobs AS j
SET state = 'executing',
    attempt = j.attempt + 1,
    attempted_at = now(),
    attempted_by = %(worker_id)s
FROM picked
WHERE j.id = picked.id
RETURNING j.id, j.step, j.args, NULLIF(j.meta, '{}'::jsonb), j.queue, j.attempt, j.max_attempts,
    j.snoozes, j.priority, j.timeout, j.workflow_id, j.workflow_step, j.scheduled_at

-- name: jobs_finish
-- Write many attempt outcomes at once; only rows still executing by this worker change.
-- A plain completion (no delay, error or snooze: most outcomes) is only its id, in
-- %(completed)s: its update parses no JSON and evaluates none of the CASEs below; the
-- others come as JSON rows in %(outcomes)s.
-- Step events given with them (JSON texts, numbered by the notification carrying each) are
-- sent for the outcomes applied; the event texts go in binary, unquoted.
WITH outcome AS (
    SELECT *
    FROM jsonb_to_recordset(%(outcomes)s::jsonb) AS o(
        id bigint, state text, delay double precision, error jsonb, snooze boolean)
), finished AS (
    UPDATE {schema}.jobs AS j
    -- A workflow step its gate sent back to wait goes back to held (pending), released by
    -- its last dependency's settlement; if that settled meanwhile, it is available now.
    SET state = CASE WHEN o.state = 'pending' AND EXISTS (
                         SELECT 1 FROM {schema}.nodes AS n
                         WHERE n.job_id = j.id AND n.pending_deps <= 0)
                     THEN 'available' ELSE o.state END,
        finalized_at = CASE WHEN o.state IN ('completed', 'discarded', 'cancelled')
                            THEN now() END,
        scheduled_at = CASE WHEN o.delay IS NULL THEN j.scheduled_at
                            ELSE now() + make_interval(secs => o.delay) END,
        errors = CASE WHEN o.error IS NULL THEN j.errors
                      ELSE j.errors || jsonb_build_array(o.error) END,
        attempt = CASE WHEN o.snooze THEN j.attempt - 1 ELSE j.attempt END,
        snoozes = j.snoozes + CASE WHEN o.snooze THEN 1 ELSE 0 END
    FROM outcome AS o
    WHERE j.id = o.id AND j.state = 'executing' AND j.attempted_by = %(worker_id)s
    RETURNING j.id, j.state, j.workflow_id
), completed AS (
    UPDATE {schema}.jobs AS j
    SET state = 'completed', finalized_at = now()
    FROM unnest(%(completed)s::bigint[]) AS c(id)
    WHERE j.id = c.id AND j.state = 'executing' AND j.attempted_by = %(worker_id)s
    RETURNING j.id, j.state, j.workflow_id
), written AS (
    SELECT * FROM finished UNION ALL SELECT * FROM completed
), announced AS (
    SELECT pg_notify(%(events_channel)s, '[' || string_agg(e.body, ',' ORDER BY e.n) || ']')
    FROM unnest(%(event_jobs)s::bigint[], %(event_chunks)s::integer[],
                %(event_bodies)b::text[]) WITH ORDINALITY AS e(job_id, chunk, body, n)
    JOIN written AS f ON f.id = e.job_id
    GROUP BY e.chunk
)
SELECT id, state, workflow_id, (SELECT count(*) FROM announced) AS notifications
FROM written

-- name: jobs_hand_back
-- Return this worker's unfinished jobs to the queue without burning their attempt.
UPDATE {schema}.jobs
SET state = 'available', attempt = attempt - 1, attempted_by = NULL, scheduled_at = now()
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'executing' AND attempted_by = %(worker_id)s
RETURNING id, queue

-- name: jobs_reconcile
-- Jobs of one queue that the table says this worker holds but it does not (%(held)s: the ids
-- it runs, waits to start or has an unwritten outcome for) go back to the queue without
-- burning their attempt: the claim's reply was lost, so they never ran here.
UPDATE {schema}.jobs
SET state = 'available', attempt = attempt - 1, attempted_by = NULL, scheduled_at = now()
WHERE state = 'executing' AND attempted_by = %(worker_id)s AND queue = %(queue)s
  AND NOT (id = ANY(%(held)s::bigint[]))
RETURNING id

-- name: job_get
-- One job, the columns of baton.job.Job by name (never *: a column added by a later
-- migration must not reach a process still on this code), hot or archived (jobs_all).
SELECT id, state, queue, step, args, meta, errors, attempt, max_attempts, snoozes, priority,
    timeout, workflow_id, workflow_step, inserted_at, scheduled_at, attempted_at,
    attempted_by, finalized_at, tags, unique_key
FROM {schema}.jobs_all
WHERE id = %(id)s

-- name: job_cancel
-- Cancel a job that has not finished; report the state it was in and who ran it.
WITH old AS (
    SELECT id, state, attempted_by FROM {schema}.jobs WHERE id = %(id)s FOR UPDATE
)
UPDATE {schema}.jobs AS j
SET state = 'cancelled', finalized_at = now()
FROM old
WHERE j.id = old.id AND old.state NOT IN ('completed', 'discarded', 'cancelled')
RETURNING old.state AS previous_state, old.attempted_by

-- name: job_retry
-- Make a job that is not running available again (a finished one included); an archived
-- job moves back into jobs as it does.
WITH restored AS (
    DELETE FROM {schema}.jobs_archive AS a
    WHERE a.id = %(id)s
    RETURNING a.id, a.queue, a.step, a.args, a.meta, a.errors, a.attempt, a.max_attempts,
        a.snoozes, a.priority, a.timeout, a.workflow_id, a.workflow_step, a.inserted_at,
        a.attempted_at, a.attempted_by, a.idempotency_key, a.tags, a.unique_key,
        a.unique_states
), back AS (
    INSERT INTO {schema}.jobs (
        id, state, queue, step, args, meta, errors, attempt, max_attempts, snoozes, priority,
        timeout, workflow_id, workflow_step, inserted_at, scheduled_at, attempted_at,
        attempted_by, finalized_at, idempotency_key, tags, unique_key, unique_states)
    SELECT id, 'available', queue, step, args, meta, errors, attempt,
        GREATEST(max_attempts, attempt + 1), snoozes, priority, timeout, workflow_id,
        workflow_step, inserted_at, now(), attempted_at, attempted_by, NULL,
        idempotency_key, tags, unique_key, unique_states
    FROM restored
    RETURNING id, queue
), retried AS (
    UPDATE {schema}.jobs
    SET state = 'available',
        scheduled_at = now(),
        finalized_at = NULL,
        max_attempts = GREATEST(max_attempts, attempt + 1)
    WHERE id = %(id)s AND state <> 'executing'
    RETURNING id, queue
)
SELECT id, queue FROM retried
UNION ALL
SELECT id, queue FROM back

-- name: queues_notify
SELECT pg_notify(%(channel)s, q) FROM unnest(%(queues)s::text[]) AS q

-- name: control_notify
SELECT pg_notify(%(channel)s, %(payload)s)

-- name: jobs_stage
-- Make due scheduled and retryable jobs available, in a bounded batch.
WITH due AS (
    SELECT id
    FROM {schema}.jobs
    WHERE state IN ('scheduled', 'retryable') AND scheduled_at <= now()
    ORDER BY scheduled_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.jobs AS j
SET state = 'available'
FROM due
WHERE j.id = due.id
RETURNING j.id, j.queue

-- name: jobs_rescue
-- Recover jobs executing on workers whose heartbeat expired. Not in the first %(ttl)s
-- seconds after the server started: a restart that took longer than a heartbeat's lifetime
-- leaves every row expired, and live workers need one beat to say they still run their jobs.
-- Never the leader's own (%(self)s): it runs, so its heartbeat only stalled, and it
-- reconciles its jobs itself.
WITH orphaned AS (
    SELECT j.id
    FROM {schema}.jobs AS j
    WHERE j.state = 'executing'
      AND j.attempted_by IS DISTINCT FROM %(self)s
      AND pg_postmaster_start_time() < now() - make_interval(secs => %(ttl)s)
      AND NOT EXISTS (
          SELECT 1 FROM {schema}.worker_registry AS w
          WHERE w.id = j.attempted_by AND w.expires_at > now())
    ORDER BY j.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.jobs AS j
SET state = CASE WHEN j.attempt >= j.max_attempts THEN 'discarded' ELSE 'available' END,
    finalized_at = CASE WHEN j.attempt >= j.max_attempts THEN now() END,
    scheduled_at = now(),
    errors = j.errors || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempt, 'at', now(), 'kind', 'rescued',
        'error', 'worker ' || COALESCE(j.attempted_by, '?') || ' stopped heartbeating'))
FROM orphaned
WHERE j.id = orphaned.id
RETURNING j.id, j.state, j.queue, j.attempted_by, j.workflow_id

-- name: jobs_prune
-- Delete a bounded batch of finished jobs older than %(max_age)s seconds (workflow steps
-- are pruned with their workflow, never on their own), with their kept results.
WITH doomed AS (
    SELECT id
    FROM {schema}.jobs
    WHERE finalized_at < now() - make_interval(secs => %(max_age)s)
      AND workflow_id IS NULL
    ORDER BY finalized_at
    LIMIT %(limit)s
), deleted AS (
    DELETE FROM {schema}.jobs AS j USING doomed WHERE j.id = doomed.id RETURNING j.id
), results_gone AS (
    DELETE FROM {schema}.job_results AS r USING deleted WHERE r.job_id = deleted.id
)
SELECT count(*) FROM deleted

-- name: worker_register
INSERT INTO {schema}.worker_registry (id, hostname, pid, queues, steps, expires_at)
VALUES (%(id)s, %(hostname)s, %(pid)s, %(queues)s, %(steps)s,
        now() + make_interval(secs => %(ttl)s))
ON CONFLICT (id) DO UPDATE
SET heartbeat_at = now(), expires_at = EXCLUDED.expires_at

-- name: worker_peers
-- The live workers and the queues each serves: one of those serving a queue acts at once on
-- an insert's NOTIFY.
SELECT id, queues FROM {schema}.worker_registry WHERE expires_at > now() ORDER BY id

-- name: worker_unregister
DELETE FROM {schema}.worker_registry WHERE id = %(id)s

-- name: workers_prune
-- Forget workers whose heartbeat expired long ago (their jobs were rescued).
DELETE FROM {schema}.worker_registry
WHERE expires_at < now() - make_interval(secs => %(after)s)

-- name: leader_elect
-- Take the lease if it is free or expired, or renew it if it is ours.
INSERT INTO {schema}.leader AS l (name, leader_id, expires_at)
VALUES (%(name)s, %(id)s, now() + make_interval(secs => %(ttl)s))
ON CONFLICT (name) DO UPDATE
SET leader_id = EXCLUDED.leader_id,
    elected_at = CASE WHEN l.leader_id = EXCLUDED.leader_id THEN l.elected_at ELSE now() END,
    expires_at = EXCLUDED.expires_at
WHERE l.leader_id = EXCLUDED.leader_id OR l.expires_at < now()
RETURNING leader_id

-- name: leader_resign
DELETE FROM {schema}.leader WHERE name = %(name)s AND leader_id = %(id)s

-- name: queue_busy_count
-- Jobs of a queue that are runnable now or running.
SELECT count(*) AS busy
FROM {schema}.jobs
WHERE queue = %(queue)s
  AND (state = 'executing' OR (state = 'available' AND scheduled_at <= now()))

-- name: job_find_waiting
-- The oldest job of a step, not yet run to completion, whose args contain %(args)s.
SELECT id
FROM {schema}.jobs
WHERE step = %(step)s
  AND state IN ('pending', 'scheduled', 'available', 'retryable')
  AND args @> %(args)s::jsonb
ORDER BY id
LIMIT 1

-- name: queues_status
-- Per queue: jobs by state and the age of the oldest job waiting to run.
SELECT queue, state, count(*) AS jobs,
    EXTRACT(EPOCH FROM now() - min(scheduled_at) FILTER (
        WHERE state = 'available')) AS oldest_available_seconds
FROM {schema}.jobs
GROUP BY queue, state
ORDER BY queue, state

-- name: jobs_unrunnable
-- Steps whose available jobs no live worker can run: none serves the queue or knows the
-- step (a worker that does not list its steps is taken to know them all).
SELECT s.queue, s.step, s.jobs
FROM (
    SELECT queue, step, count(*) AS jobs
    FROM {schema}.jobs
    WHERE state = 'available'
    GROUP BY queue, step
) AS s
WHERE NOT EXISTS (
    SELECT 1 FROM {schema}.worker_registry AS w
    WHERE w.expires_at > now() AND w.queues ? s.queue
      AND (w.steps IS NULL OR s.step = ANY(w.steps)))
ORDER BY s.queue, s.step

-- name: workers_live
SELECT id, hostname, pid, queues, started_at, heartbeat_at
FROM {schema}.worker_registry
WHERE expires_at > now()
ORDER BY started_at

-- name: jobs_live_counts
-- Unfinished jobs per queue and state, each state read from the partial index that holds
-- only it: available (jobs_fetch_idx), scheduled and retryable (jobs_stage_idx), executing
-- (jobs_executing_idx); pending steps through the running workflows (workflows_running_idx,
-- then each step's node and job by key). The oldest available job's wait comes with it.
-- The dashboard's overview and the metrics read it; no state is counted from the table.
SELECT queue, 'available' AS state, count(*) AS jobs,
    GREATEST(EXTRACT(EPOCH FROM now() - min(scheduled_at))::float8, 0) AS oldest_seconds
FROM {schema}.jobs
WHERE state = 'available'
GROUP BY queue
UNION ALL
SELECT queue, state, count(*), NULL
FROM {schema}.jobs
WHERE state IN ('scheduled', 'retryable')
GROUP BY queue, state
UNION ALL
SELECT queue, 'executing', count(*), NULL
FROM {schema}.jobs
WHERE state = 'executing'
GROUP BY queue
UNION ALL
SELECT j.queue, 'pending', count(*), NULL
FROM {schema}.workflows AS w
JOIN {schema}.nodes AS n ON n.workflow_id = w.id
JOIN {schema}.jobs AS j ON j.id = n.job_id
WHERE w.finished_at IS NULL AND j.state = 'pending'
GROUP BY j.queue
