-- Unique jobs and workflows (baton.unique, migration 0011). {schema} is the quoted schema.
-- A key with a period ends with its period number, counted on the server's clock
-- (%(now)s, when given, stands for it in tests).

-- name: jobs_insert_unique
-- Insert jobs (lines of JobSpec.row_json, unique ones with unique_key, unique_period and
-- unique_states) unless another job holds their key; one row back per input row, in order:
-- its position, its full key, the id of the job inserted or of the one holding the key,
-- and whether that is another job (duplicate). A job of this batch holds its key against
-- the later ones. The id is NULL when the holder committed after this statement began (it
-- waited for it): jobs_get_by_unique_key, a new statement, sees it. Jobs without a key
-- never conflict. Ids are drawn here so that each inserted row is found by its line.
WITH input AS (
    SELECT t.*, nextval('{schema}.jobs_id_seq'::regclass) AS id,
        CASE WHEN t.unique_period IS NULL THEN t.unique_key
             ELSE t.unique_key || ':' || floor(extract(epoch FROM
                 COALESCE(%(now)s::timestamptz, now())) / t.unique_period)::bigint::text
        END AS full_key
    FROM ROWS FROM (jsonb_to_recordset(%(rows)s::jsonb) AS (
        state text, queue text, step text, args jsonb, meta jsonb, max_attempts integer,
        priority smallint, timeout double precision, scheduled_at timestamptz, tags text[],
        unique_key text, unique_period double precision, unique_states text[]))
        WITH ORDINALITY AS t(
        state, queue, step, args, meta, max_attempts, priority, timeout, scheduled_at, tags,
        unique_key, unique_period, unique_states, ord)
), inserted AS (
    INSERT INTO {schema}.jobs (
        id, state, queue, step, args, meta, max_attempts, priority, timeout, scheduled_at,
        tags, unique_key, unique_states)
    SELECT
        id,
        CASE WHEN state = 'available' AND scheduled_at > now() THEN 'scheduled' ELSE state END,
        queue, step, args, meta, max_attempts, priority, timeout,
        COALESCE(scheduled_at, now()), COALESCE(tags, '{}'), full_key, unique_states
    FROM input
    -- Keys in one order everywhere: two batches holding keys the other waits for would
    -- deadlock. The ids were drawn in the batch's order.
    ORDER BY full_key, ord
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state = ANY(unique_states)
    DO NOTHING
    RETURNING id, queue, state, unique_key
), woken AS (
    SELECT count(pg_notify(%(channel)s, queue)) AS queues
    FROM (SELECT DISTINCT queue FROM inserted WHERE state = 'available') AS q
)
SELECT
    i.ord,
    i.full_key,
    COALESCE(
        n.id,
        (SELECT min(w.id) FROM inserted AS w WHERE w.unique_key = i.full_key),
        (SELECT j.id FROM {schema}.jobs AS j
         WHERE j.unique_key = i.full_key AND j.unique_key IS NOT NULL
           AND j.state = ANY(j.unique_states)
         LIMIT 1)) AS id,
    n.id IS NULL AS duplicate,
    (SELECT queues FROM woken) AS woken
FROM input AS i
LEFT JOIN inserted AS n ON n.id = i.id
ORDER BY i.ord

-- name: jobs_get_by_unique_key
-- The jobs holding some keys (full keys, as jobs_insert_unique returns them).
SELECT unique_key, id
FROM {schema}.jobs
WHERE unique_key = ANY(%(keys)s::text[]) AND unique_key IS NOT NULL
  AND state = ANY(unique_states)

-- name: workflow_insert_unique
-- As workflow_insert (keep the two in step), unless another workflow holds the key: then
-- nothing is inserted and that workflow's id comes back with duplicate = true. No row when
-- the holder committed after this statement began (workflow_get_by_unique_key sees it).
WITH key AS (
    SELECT CASE WHEN %(unique_period)s::double precision IS NULL THEN %(unique_key)s::text
                ELSE %(unique_key)s::text || ':' || floor(extract(epoch FROM
                    COALESCE(%(now)s::timestamptz, now()))
                    / %(unique_period)s::double precision)::bigint::text
           END AS full_key
), inserted AS (
    INSERT INTO {schema}.workflows (
        id, label, ignore_cancelled, ignore_discarded, debug, total_steps, unique_key,
        unique_states)
    SELECT %(id)s, %(label)s, %(ignore_cancelled)s, %(ignore_discarded)s, %(debug)s,
        %(total)s, key.full_key, %(unique_states)s::text[]
    FROM key
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state = ANY(unique_states)
    DO NOTHING
    RETURNING id
)
SELECT id, false AS duplicate FROM inserted
UNION ALL
SELECT w.id, true
FROM {schema}.workflows AS w, key
WHERE w.unique_key = key.full_key AND w.unique_key IS NOT NULL
  AND w.state = ANY(w.unique_states) AND NOT EXISTS (SELECT FROM inserted)

-- name: workflow_get_by_unique_key
-- The workflow holding a key, computed as workflow_insert_unique does (in the same
-- transaction, so with the same now()).
SELECT w.id
FROM {schema}.workflows AS w
WHERE w.unique_key = CASE
        WHEN %(unique_period)s::double precision IS NULL THEN %(unique_key)s::text
        ELSE %(unique_key)s::text || ':' || floor(extract(epoch FROM
            COALESCE(%(now)s::timestamptz, now()))
            / %(unique_period)s::double precision)::bigint::text
    END
  AND w.unique_key IS NOT NULL AND w.state = ANY(w.unique_states)
