-- The jobs archive (migration 16): finished plain jobs move out of the hot jobs table into
-- jobs_archive, partitioned by the UTC day they finished. {schema} is the quoted schema.
--
-- A job is archived once it finished more than %(max_age)s seconds ago, unless it belongs
-- to a workflow (its workflow's pruning takes it) or still holds a key: an idempotency key,
-- or a unique key in one of its unique states (leaving jobs would release the key early).
-- Those stay in jobs until prune_after deletes them.

-- name: jobs_archive_day
-- The oldest job due for the archive that finished at or after %(since)s (the leader's
-- bookmark: the jobs before it were not due when it last looked, so a pass does not read
-- again, in jobs_finalized_idx, every workflow step or keyed job that stays): make sure its
-- day's partition exists; return it and the end of that day (the next move takes only that
-- day's jobs). No row when none is due.
SELECT finalized_at AS oldest, {schema}.jobs_archive_partition(finalized_at) AS day_end
FROM (
    SELECT finalized_at
    FROM {schema}.jobs
    WHERE finalized_at < now() - make_interval(secs => %(max_age)s)
      -- A leader without a bookmark starts a minute before the newest archived job.
      AND finalized_at >= COALESCE(
          %(since)s::timestamptz,
          (SELECT max(a.finalized_at) FROM {schema}.jobs_archive AS a) - interval '1 minute',
          '-infinity')
      AND workflow_id IS NULL AND idempotency_key IS NULL
      AND (unique_key IS NULL OR NOT (state = ANY(unique_states)))
    ORDER BY finalized_at
    LIMIT 1
) AS oldest

-- name: jobs_archive_move
-- Move a batch of jobs due for the archive that finished from %(since)s (the oldest due)
-- to before %(day_end)s (one day's partition), oldest first, in one statement: the rows leave jobs and enter the archive in
-- the same transaction, so a reader of jobs_all sees each job exactly once. Rows locked
-- by someone else (a retry by hand) are skipped until the next pass.
WITH due AS (
    SELECT id
    FROM {schema}.jobs
    WHERE finalized_at < LEAST(now() - make_interval(secs => %(max_age)s),
                               %(day_end)s::timestamptz)
      AND finalized_at >= %(since)s::timestamptz
      -- Only jobs the metrics counters have counted (baton.metrics reads jobs alone).
      AND finalized_at < COALESCE((SELECT m.counted_until FROM {schema}.metrics_sources AS m
                                   WHERE m.source = 'jobs'), 'infinity')
      AND workflow_id IS NULL AND idempotency_key IS NULL
      AND (unique_key IS NULL OR NOT (state = ANY(unique_states)))
    ORDER BY finalized_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), moved AS (
    DELETE FROM {schema}.jobs AS j
    USING due
    WHERE j.id = due.id
      -- Still finished: a retry that committed after the read above made it runnable.
      AND j.finalized_at IS NOT NULL
    RETURNING j.id, j.state, j.queue, j.step, j.args, j.meta, j.errors, j.attempt,
        j.max_attempts, j.snoozes, j.priority, j.timeout, j.workflow_id, j.workflow_step,
        j.inserted_at, j.scheduled_at, j.attempted_at, j.attempted_by, j.finalized_at,
        j.idempotency_key, j.tags, j.unique_key, j.unique_states
), archived AS (
    INSERT INTO {schema}.jobs_archive (
        id, state, queue, step, args, meta, errors, attempt, max_attempts, snoozes, priority,
        timeout, workflow_id, workflow_step, inserted_at, scheduled_at, attempted_at,
        attempted_by, finalized_at, idempotency_key, tags, unique_key, unique_states)
    SELECT id, state, queue, step, args, meta, errors, attempt, max_attempts, snoozes,
        priority, timeout, workflow_id, workflow_step, inserted_at, scheduled_at,
        attempted_at, attempted_by, finalized_at, idempotency_key, tags, unique_key,
        unique_states
    FROM moved
    RETURNING 1
)
SELECT count(*) FROM archived

-- name: jobs_archive_drop
-- Retention: drop the archive's day partitions that ended more than %(max_age)s seconds
-- ago (with their jobs' kept results); waits at most %(wait)s seconds for the lock.
SELECT {schema}.jobs_archive_drop(now() - make_interval(secs => %(max_age)s),
                                  make_interval(secs => %(wait)s)) AS dropped

-- name: jobs_archive_sizes
-- Rows in the hot jobs table and in the archive, and the archive's partitions.
SELECT (SELECT count(*) FROM {schema}.jobs) AS hot,
    (SELECT count(*) FROM {schema}.jobs_archive) AS archived,
    (SELECT count(*) FROM pg_inherits
     WHERE inhparent = '{schema}.jobs_archive'::regclass) AS partitions
