-- Metrics read at each scrape (baton/metrics.py, migration 0017). {schema} is the quoted
-- schema name. Every read of jobs goes through one of its partial indexes: the live states
-- through the fetch, stage and executing indexes (their rows only), the finished rows
-- through jobs_finalized_idx from a watermark on (the rows finished since the last advance).

-- name: metrics_read_committed
-- The advance: each statement sees what committed before it (the horizon is read first).
SET TRANSACTION ISOLATION LEVEL READ COMMITTED

-- name: metrics_snapshot
-- The scrape's reads: one snapshot, so the counters and the rows past their watermark agree.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY

-- name: metrics_horizon
-- How far the counters may be advanced: every row finished before the horizon has
-- committed. A row's finish time is its transaction's now(), so a transaction still open
-- holds the horizon at its start; then nothing later than this transaction's own start (a
-- clock read here, after pg_stat_activity, would pass a transaction that began while it
-- was read, whose finishes, dated before that clock, would never be counted). Transactions
-- open longer than %(max_lag)s seconds are not waited for (a finish they commit later,
-- dated before the horizon, is not counted), nor rows older than %(through_age)s seconds
-- (they are about to be pruned: count them first). Sessions of other roles show no
-- xact_start without pg_read_all_stats, and are not waited for.
SELECT GREATEST(
    LEAST(now(), COALESCE(min(a.xact_start), 'infinity')),
    clock_timestamp() - make_interval(secs => %(max_lag)s),
    clock_timestamp() - make_interval(secs => %(through_age)s))
FROM pg_stat_activity AS a
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
  AND a.backend_type = 'client backend' AND a.xact_start IS NOT NULL

-- name: metrics_sources_lock
-- Take the watermarks to advance them; none when another session is advancing them now.
SELECT source, counted_until
FROM {schema}.metrics_sources
ORDER BY source
FOR UPDATE SKIP LOCKED

-- name: metrics_sources
SELECT source, counted_until FROM {schema}.metrics_sources

-- name: metrics_counters
SELECT name, labels, value FROM {schema}.metrics_counters

-- name: metrics_counters_add
-- Add what the rows in [counted_until, %(horizon)s) amount to, and move the watermarks.
WITH added AS (
    INSERT INTO {schema}.metrics_counters AS c (name, labels, value)
    SELECT t.name, t.labels, t.value
    FROM unnest(%(names)s::text[], %(labels)s::jsonb[], %(values)s::numeric[])
        AS t(name, labels, value)
    ON CONFLICT (name, labels) DO UPDATE SET value = c.value + EXCLUDED.value
    RETURNING 1
)
UPDATE {schema}.metrics_sources
SET counted_until = %(horizon)s, advanced_at = now()
WHERE counted_until < %(horizon)s
RETURNING source, (SELECT count(*) FROM added) AS rows

-- name: metrics_jobs_delta
-- What the jobs finished in [%(since)s, %(until)s) add to the counters: finished jobs by
-- queue, step and state; retries (attempts after the first) and failed attempts by kind
-- (%(failure_kinds)s, from the job's errors) by queue and step; and the run time of the
-- completed ones (claim of the last attempt to the finish) by queue, into the buckets whose
-- upper bounds %(negated_bounds)s holds negated in ascending order (named %(les)s, one
-- more: +Inf), with its sum.
-- The rows are read once into a handful of groups and every counter is summed from those:
-- 0.6 to 1.2 us of server time a finished job, against 2.1 to 3.8 for a pass over the rows
-- per counter (400,000 jobs), a cost the maintenance leader pays for every job. No value
-- grows with the rows: a window of many failed jobs with long tracebacks counts like any.
WITH grouped AS MATERIALIZED (
    -- A job with errors comes once per error entry (n counts them): it counts as a job, a
    -- retry and a run time on its first entry only, each entry of a failure kind counts.
    SELECT f.queue, f.step, f.state,
        -- 1 + the bounds below the run time (le: a run time on a bound is in its bucket).
        -- width_bucket counts, by binary search, the thresholds at or below its operand.
        cardinality(%(negated_bounds)s::float8[]) + 1
            - width_bucket(-f.seconds, %(negated_bounds)s::float8[]) AS bucket,
        e.kind,
        count(*) FILTER (WHERE e.n IS NULL OR e.n = 1) AS jobs,
        sum(f.attempt - 1) FILTER (WHERE f.attempt > 1 AND (e.n IS NULL OR e.n = 1))
            AS retries,
        sum(f.seconds) FILTER (WHERE e.n IS NULL OR e.n = 1) AS seconds,
        count(*) FILTER (WHERE e.kind = ANY(%(failure_kinds)s::text[])) AS failures
    FROM (
        SELECT queue, step, state, attempt, NULLIF(errors, '[]'::jsonb) AS errors,
            CASE WHEN state = 'completed' AND attempted_at IS NOT NULL
                 THEN GREATEST(EXTRACT(EPOCH FROM finalized_at - attempted_at)::float8, 0)
            END AS seconds
        FROM {schema}.jobs
        WHERE finalized_at >= %(since)s AND finalized_at < %(until)s::timestamptz
    ) AS f
    LEFT JOIN LATERAL (
        SELECT COALESCE(entry ->> 'kind', 'error') AS kind, n
        FROM jsonb_array_elements(f.errors) WITH ORDINALITY AS a(entry, n)
    ) AS e ON true
    GROUP BY f.queue, f.step, f.state, bucket, e.kind
)
SELECT 'jobs_finished' AS name,
    jsonb_build_object('queue', queue, 'step', step, 'state', state) AS labels,
    sum(jobs)::numeric AS value
FROM grouped
GROUP BY queue, step, state
UNION ALL
SELECT 'job_retries', jsonb_build_object('queue', queue, 'step', step), sum(retries)
FROM grouped
WHERE retries IS NOT NULL
GROUP BY queue, step
UNION ALL
SELECT 'job_failures', jsonb_build_object('queue', queue, 'step', step, 'kind', kind),
    sum(failures)
FROM grouped
WHERE failures > 0
GROUP BY queue, step, kind
UNION ALL
SELECT 'job_duration_bucket',
    jsonb_build_object('queue', queue, 'le', (%(les)s::text[])[bucket]), sum(jobs)
FROM grouped
WHERE bucket IS NOT NULL
GROUP BY queue, bucket
UNION ALL
SELECT 'job_duration_sum', jsonb_build_object('queue', queue), sum(seconds)::numeric
FROM grouped
WHERE seconds IS NOT NULL
GROUP BY queue

-- name: metrics_workflows_delta
-- Workflow runs finished in [%(since)s, %(until)s), by outcome (a resumed workflow's next
-- run counts again when it ends).
SELECT 'workflows_finished' AS name, jsonb_build_object('outcome', state) AS labels,
    count(*)::numeric AS value
FROM {schema}.workflows
WHERE finished_at >= %(since)s AND finished_at < %(until)s::timestamptz
GROUP BY state

-- name: metrics_usage_delta
-- Usage recorded in [%(since)s, %(until)s), by model: calls, tokens by kind, and the cost of
-- the priced calls (in US dollars).
WITH used AS MATERIALIZED (
    SELECT COALESCE(model, '') AS model, input_tokens, output_tokens, cached_tokens,
        cache_write_tokens, cost
    FROM {schema}.step_stats
    WHERE inserted_at >= %(since)s AND inserted_at < %(until)s::timestamptz
)
SELECT 'llm_calls' AS name, jsonb_build_object('model', model) AS labels,
    count(*)::numeric AS value
FROM used
GROUP BY model
UNION ALL
SELECT 'llm_tokens', jsonb_build_object('model', u.model, 'kind', t.kind), sum(t.tokens)
FROM used AS u
CROSS JOIN LATERAL (VALUES ('input', u.input_tokens), ('output', u.output_tokens),
                           ('cached', u.cached_tokens), ('cache_write', u.cache_write_tokens))
    AS t(kind, tokens)
GROUP BY u.model, t.kind
UNION ALL
SELECT 'llm_cost_usd', jsonb_build_object('model', model), sum(cost)
FROM used
WHERE cost IS NOT NULL
GROUP BY model

-- name: metrics_gauges
-- Running workflows (through workflows_running_idx) and live workers.
SELECT
    (SELECT count(*) FROM {schema}.workflows WHERE finished_at IS NULL) AS workflows_running,
    (SELECT count(*) FROM {schema}.worker_registry WHERE expires_at > now()) AS workers
