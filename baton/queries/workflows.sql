-- Runtime queries of the workflow engine. {schema} is the quoted schema name.

-- name: workflow_insert
INSERT INTO {schema}.workflows (id, label, ignore_cancelled, ignore_discarded, debug, total_steps)
VALUES (%(id)s, %(label)s, %(ignore_cancelled)s, %(ignore_discarded)s, %(debug)s, %(total)s)

-- name: nodes_insert
INSERT INTO {schema}.nodes (
    workflow_id, name, job_id, step, deps, group_name, model, ignore_cancelled,
    ignore_discarded, min_success, strict, pending_deps)
SELECT workflow_id, name, job_id, step, ARRAY(SELECT jsonb_array_elements_text(deps)),
    group_name, model, ignore_cancelled, ignore_discarded, min_success, strict, pending_deps
FROM jsonb_to_recordset(%(rows)s::jsonb) AS t(
    workflow_id uuid, name text, job_id bigint, step text, deps jsonb, group_name text,
    model text, ignore_cancelled boolean, ignore_discarded boolean, min_success integer,
    strict boolean, pending_deps integer)

-- name: edges_insert
INSERT INTO {schema}.edges (workflow_id, dep, node)
SELECT %(workflow_id)s, dep, node
FROM jsonb_to_recordset(%(rows)s::jsonb) AS t(dep text, node text)

-- name: workflows_lock
-- Serialize settlement per workflow (in id order, so two batches never deadlock).
SELECT id FROM {schema}.workflows
WHERE id = ANY(%(ids)s::uuid[])
ORDER BY id
FOR UPDATE

-- name: workflow_lock_for_append
SELECT finished_at IS NOT NULL AS finished,
       ARRAY(SELECT name FROM {schema}.nodes WHERE workflow_id = w.id) AS names,
       ARRAY(SELECT name FROM {schema}.completions WHERE workflow_id = w.id) AS settled,
       ARRAY(SELECT DISTINCT group_name FROM {schema}.nodes
             WHERE workflow_id = w.id AND group_name IS NOT NULL) AS groups
FROM {schema}.workflows AS w
WHERE id = %(id)s
FOR UPDATE

-- name: workflow_group_members
SELECT group_name, array_agg(name ORDER BY name) AS members
FROM {schema}.nodes
WHERE workflow_id = %(id)s AND group_name = ANY(%(groups)s::text[])
GROUP BY group_name

-- name: workflow_grow
UPDATE {schema}.workflows SET total_steps = total_steps + %(count)s WHERE id = %(id)s

-- name: steps_settle
-- Record settlements (only a step's first counts), count them on their workflows, count
-- down the dependents and release those with nothing left to wait on (waking their
-- queues). Returns the workflows whose every step has now settled, finished here once.
-- Run after workflows_lock. A step counts only if its job is in that final state now, so
-- this is sent along with the finish, before knowing which outcomes it applied.
-- A failed step does not fail its workflow when a step that needs only a quorum of its
-- dependencies (min_success) completed without it, unless that step is strict.
WITH input AS (
    SELECT t.workflow_id, t.name, t.outcome
    FROM jsonb_to_recordset(%(rows)s::jsonb)
        AS t(workflow_id uuid, name text, outcome text, job_id bigint)
    -- One primary-key probe per step (OFFSET 0 keeps it a nested loop): a hash join read
    -- all of jobs, 2 ms of a 400-step settlement in a 1 -> 10,000 -> 1 workflow.
    CROSS JOIN LATERAL (
        SELECT 1 FROM {schema}.jobs AS j
        WHERE j.id = t.job_id AND j.state = t.outcome
        OFFSET 0
    ) AS j
), new AS (
    INSERT INTO {schema}.completions (workflow_id, name, outcome)
    SELECT workflow_id, name, outcome FROM input
    ON CONFLICT DO NOTHING
    RETURNING workflow_id, name, outcome
), absorbed AS (
    -- Dependencies a quorum step completed without.
    SELECT e.workflow_id, e.dep AS name
    FROM new AS s
    JOIN {schema}.nodes AS n ON n.workflow_id = s.workflow_id AND n.name = s.name
    JOIN {schema}.edges AS e ON e.workflow_id = n.workflow_id AND e.node = n.name
    WHERE s.outcome = 'completed' AND n.min_success IS NOT NULL AND NOT n.strict
), counts AS (
    -- The workflows' failed steps once these settled (read under workflows_lock).
    SELECT c.workflow_id, c.n,
           ARRAY(SELECT x FROM unnest(w.failed_steps || c.failed) AS x
                 WHERE NOT EXISTS (SELECT 1 FROM absorbed AS a
                                   WHERE a.workflow_id = c.workflow_id AND a.name = x))
               AS failed
    FROM (SELECT workflow_id, count(*)::integer AS n,
                 COALESCE(array_agg(name ORDER BY name)
                          FILTER (WHERE outcome <> 'completed'), '{}') AS failed
          FROM new
          GROUP BY workflow_id) AS c
    JOIN {schema}.workflows AS w ON w.id = c.workflow_id
), tally AS (
    UPDATE {schema}.workflows AS w
    SET settled_steps = w.settled_steps + counts.n,
        failed_steps = counts.failed,
        state = CASE
            WHEN w.settled_steps + counts.n < w.total_steps THEN 'running'
            WHEN cardinality(counts.failed) > 0 THEN 'failed'
            ELSE 'completed' END,
        finished_at = CASE WHEN w.settled_steps + counts.n >= w.total_steps THEN now() END
    FROM counts
    WHERE w.id = counts.workflow_id AND w.finished_at IS NULL
    RETURNING w.id, w.label, w.state, w.failed_steps, w.finished_at, w.run, w.total_steps,
        w.settled_steps, w.stop_reason, w.spent_usd
), hits AS (
    -- Index probes per settled step (OFFSET 0): a hash join read every edge of the table.
    SELECT e.workflow_id, e.node, count(*)::integer AS n
    FROM new AS s
    CROSS JOIN LATERAL (
        SELECT e.workflow_id, e.node FROM {schema}.edges AS e
        WHERE e.workflow_id = s.workflow_id AND e.dep = s.name
        OFFSET 0
    ) AS e
    GROUP BY e.workflow_id, e.node
), counted AS (
    UPDATE {schema}.nodes AS d
    SET pending_deps = d.pending_deps - hits.n
    FROM hits
    WHERE d.workflow_id = hits.workflow_id AND d.name = hits.node
    RETURNING d.job_id, d.pending_deps
), released AS (
    UPDATE {schema}.jobs AS j
    SET state = CASE WHEN j.scheduled_at > now() THEN 'scheduled' ELSE 'available' END,
        scheduled_at = GREATEST(j.scheduled_at, now())
    FROM counted
    WHERE j.id = counted.job_id AND counted.pending_deps <= 0 AND j.state = 'pending'
    RETURNING j.id, j.queue, j.state
), woken AS (
    SELECT count(pg_notify(%(channel)s, queue)) AS n
    FROM (SELECT DISTINCT queue FROM released WHERE state = 'available') AS q
)
-- One row at least (the notifications go out only if woken is read), then one per
-- finished workflow.
SELECT t.id, t.label, t.state, t.failed_steps, t.finished_at, t.run, t.total_steps,
    t.settled_steps, t.stop_reason, t.spent_usd, woken.n AS woken
FROM woken
LEFT JOIN tally AS t ON t.state <> 'running'

-- name: node_gates
-- What steps need before they run: their node, their workflow's flags, how many
-- dependencies they have, which declared ones are fan-out groups, and the ones that did
-- not complete, in detail (with whether their rows still exist). A dependency that
-- completed needs no more than its result (node_dep_results): the 1 -> 10,000 -> 1
-- fan-in's last step read its gate in 123 ms with every dependency in detail, 35 ms so.
SELECT n.workflow_id, n.name, n.has_result, n.result -> 'value' AS result, n.deps, n.model,
    n.min_success,
    COALESCE(n.ignore_cancelled, w.ignore_cancelled) AS ignore_cancelled,
    COALESCE(n.ignore_discarded, w.ignore_discarded) AS ignore_discarded,
    w.label, w.debug, x.dep_count, x.dependencies,
    -- The declared dependencies that are fan-out groups: no step has their name.
    ARRAY(SELECT g FROM unnest(n.deps) AS g
          WHERE NOT EXISTS (SELECT 1 FROM {schema}.nodes AS m
                            WHERE m.workflow_id = n.workflow_id AND m.name = g)) AS groups
FROM jsonb_each(%(steps)s::jsonb) AS s(workflow_id, names)
CROSS JOIN jsonb_array_elements_text(s.names) AS t(name)
-- One primary-key lookup per step, whatever the statistics say: OFFSET 0 keeps the planner
-- from joining all of a workflow's nodes and filtering them by name.
CROSS JOIN LATERAL (
    SELECT * FROM {schema}.nodes AS n
    WHERE n.workflow_id = s.workflow_id::uuid AND n.name = t.name
    OFFSET 0
) AS n
JOIN {schema}.workflows AS w ON w.id = n.workflow_id
-- No ORDER BY or DISTINCT in here: each costs a sort per step. Whether a dependency's
-- rows still exist is asked only of those that did not complete (the FILTER comes first):
-- one that completed counts as done, whatever became of its node since.
CROSS JOIN LATERAL (
    SELECT count(*)::integer AS dep_count,
        COALESCE(jsonb_agg(jsonb_build_object(
                     'name', e.dep, 'outcome', c.outcome,
                     'exists', EXISTS (SELECT 1 FROM {schema}.nodes AS d
                                       WHERE d.workflow_id = e.workflow_id
                                         AND d.name = e.dep)))
                 FILTER (WHERE c.outcome IS DISTINCT FROM 'completed'), '[]') AS dependencies
    FROM {schema}.edges AS e
    LEFT JOIN {schema}.completions AS c ON c.workflow_id = e.workflow_id AND c.name = e.dep
    WHERE e.workflow_id = n.workflow_id AND e.node = n.name
) AS x

-- name: node_dep_results
-- The results of the steps' dependencies, each once however many of the steps share it
-- (as JSON text: every step parses its own copy), with the fan-out group and model of each.
-- Index probes all through (OFFSET 0): the planner, expecting a hundred steps of each
-- JSON set function, read every edge and node of the table instead.
SELECT d.workflow_id, d.name, d.group_name, d.model, (d.result -> 'value')::text AS result
FROM (
    SELECT DISTINCT e.workflow_id, e.dep
    FROM jsonb_each(%(steps)s::jsonb) AS s(workflow_id, names)
    CROSS JOIN jsonb_array_elements_text(s.names) AS t(name)
    CROSS JOIN LATERAL (
        SELECT e.workflow_id, e.dep FROM {schema}.edges AS e
        WHERE e.workflow_id = s.workflow_id::uuid AND e.node = t.name
        OFFSET 0
    ) AS e
) AS x
CROSS JOIN LATERAL (
    SELECT * FROM {schema}.nodes AS d
    WHERE d.workflow_id = x.workflow_id AND d.name = x.dep AND d.has_result
    OFFSET 0
) AS d

-- name: nodes_keep_results
-- Keep steps' results, committed before their completion is written: a step retried after
-- a crash in between returns its result instead of running again.
UPDATE {schema}.nodes AS n
SET result = jsonb_build_object('value', t.result), has_result = true, result_at = now()
FROM jsonb_to_recordset(%(rows)s::jsonb) AS t(workflow_id uuid, name text, result jsonb)
WHERE n.workflow_id = t.workflow_id AND n.name = t.name

-- name: node_result
SELECT has_result, result -> 'value' AS value
FROM {schema}.nodes
WHERE workflow_id = %(workflow_id)s AND name = %(name)s

-- name: workflow_results
SELECT name, result -> 'value' AS value FROM {schema}.nodes
WHERE workflow_id = %(workflow_id)s AND has_result
ORDER BY name

-- name: workflow_get
SELECT id, label, state, total_steps, settled_steps, failed_steps, inserted_at, finished_at
FROM {schema}.workflows WHERE id = %(id)s

-- name: job_workflow
-- A job's workflow step, if it is one: what a cancel announces, what a retry resumes.
SELECT j.workflow_id, j.workflow_step, j.step, j.attempt, j.state, w.label
FROM {schema}.jobs AS j
LEFT JOIN {schema}.workflows AS w ON w.id = j.workflow_id
WHERE j.id = %(id)s

-- name: jobs_unsettled
-- Backstop: finished steps of running workflows (of %(workflow_ids)s only, unless NULL)
-- whose settlement was never recorded.
SELECT j.workflow_id, j.workflow_step, j.state, j.step, j.id AS job_id, j.attempt,
    j.errors -> -1 ->> 'error' AS error, w.label
FROM {schema}.workflows AS w
JOIN {schema}.jobs AS j ON j.workflow_id = w.id
WHERE w.finished_at IS NULL
  AND (%(workflow_ids)s::uuid[] IS NULL OR w.id = ANY(%(workflow_ids)s::uuid[]))
  AND j.state IN ('completed', 'discarded', 'cancelled')
  AND NOT EXISTS (
      SELECT 1 FROM {schema}.completions AS c
      WHERE c.workflow_id = j.workflow_id AND c.name = j.workflow_step)
LIMIT %(limit)s

-- name: nodes_stranded
-- Backstop: held steps with nothing left to wait on (release them).
UPDATE {schema}.jobs AS j
SET state = CASE WHEN j.scheduled_at > now() THEN 'scheduled' ELSE 'available' END,
    scheduled_at = GREATEST(j.scheduled_at, now())
FROM {schema}.nodes AS n
JOIN {schema}.workflows AS w ON w.id = n.workflow_id
WHERE w.finished_at IS NULL AND n.pending_deps <= 0 AND j.id = n.job_id
  AND j.state = 'pending'
RETURNING j.id, j.queue

-- name: event_payload_get
SELECT payload FROM {schema}.event_payloads WHERE id = %(id)s

-- name: workflows_finished_since
-- A subscriber catching up: the server's clock, then every workflow that finished at or
-- after %(since)s (default: %(margin)s seconds ago), oldest first; one row with only the
-- clock when none did. workflows_finished_idx serves it.
SELECT now() AS read_at, w.id, w.label, w.state, w.failed_steps, w.finished_at, w.run,
    w.stop_reason, w.spent_usd
FROM (SELECT 1) AS clock
LEFT JOIN LATERAL (
    SELECT id, label, state, failed_steps, finished_at, run, stop_reason, spent_usd
    FROM {schema}.workflows
    WHERE finished_at >= COALESCE(%(since)s::timestamptz,
                                  now() - make_interval(secs => %(margin)s))
) AS w ON true
ORDER BY w.finished_at, w.id

-- name: workflow_finished_get
-- A subscriber of one workflow catching up: the workflow, if it finished (its latest run).
SELECT id, label, state, failed_steps, finished_at, run, stop_reason, spent_usd
FROM {schema}.workflows
WHERE id = %(id)s AND finished_at IS NOT NULL

-- name: workflow_steps_latest
-- A subscriber of one workflow catching up: every step that is running or has ended, in
-- its latest state, with the fields of its workflow_step_updated event.
SELECT n.name, n.step, j.state, j.id, j.attempt,
    j.state = 'completed' AND n.has_result AS has_result,
    CASE WHEN j.state IN ('retryable', 'discarded', 'cancelled')
         THEN j.errors -> -1 ->> 'error' END AS error,
    COALESCE(j.finalized_at, j.attempted_at, now()) AS at,
    w.label
FROM {schema}.nodes AS n
JOIN {schema}.workflows AS w ON w.id = n.workflow_id
JOIN {schema}.jobs AS j ON j.id = n.job_id
WHERE n.workflow_id = %(id)s
  AND j.state IN ('executing', 'retryable', 'completed', 'discarded', 'cancelled')
ORDER BY COALESCE(j.finalized_at, j.attempted_at), j.id

-- name: events_notify
-- Send event payloads built by the caller (JSON arrays that fit one notification each).
-- The chunks go in binary: no array quoting of their JSON on either side.
SELECT pg_notify(%(channel)s, chunk) FROM unnest(%(chunks)b::text[]) AS chunk

-- name: events_notify_large
-- Send event payloads too large for NOTIFY: each is kept in event_payloads and travels by
-- reference.
SELECT {schema}.emit_many(%(channel)s, %(payloads)s::jsonb)

-- name: workflow_steps_get
-- Every step of one workflow, for a page that loads after steps already ran.
SELECT s.step_name, s.function, s.state, s.attempt, s.max_attempts, s.deps, s.model,
    s.has_result, s.last_error, s.job_id, s.attempted_at, s.finalized_at, s.group_name,
    (SELECT sum(st.cost) FROM {schema}.step_stats AS st
     WHERE st.workflow_id = s.workflow_id AND st.step_name = s.step_name) AS cost
FROM {schema}.workflow_steps AS s
WHERE s.workflow_id = %(id)s
ORDER BY s.job_id

-- name: workflows_list
SELECT id, label, state, total_steps, settled_steps, failed_steps, inserted_at, finished_at
FROM {schema}.workflows
WHERE (%(label)s::text IS NULL OR label = %(label)s)
  AND (%(state)s::text IS NULL OR state = %(state)s)
ORDER BY inserted_at DESC, id
LIMIT %(limit)s

-- name: step_stats_insert
INSERT INTO {schema}.step_stats (
    workflow_id, step_name, job_id, attempt, model, input_tokens, output_tokens,
    cached_tokens, cache_write_tokens, duration_ms, cost)
SELECT workflow_id, step_name, job_id, attempt, model, input_tokens, output_tokens,
    cached_tokens, cache_write_tokens, duration_ms, cost
FROM jsonb_to_recordset(%(rows)s::jsonb) AS t(
    workflow_id uuid, step_name text, job_id bigint, attempt integer, model text,
    input_tokens integer, output_tokens integer, cached_tokens integer,
    cache_write_tokens integer, duration_ms double precision, cost numeric)

-- name: debug_logs_insert
INSERT INTO {schema}.debug_logs (
    workflow_id, step_name, job_id, attempt, request, response, context, extra)
SELECT workflow_id, step_name, job_id, attempt, request, response, context, extra
FROM jsonb_to_recordset(%(rows)s::jsonb) AS t(
    workflow_id uuid, step_name text, job_id bigint, attempt integer, request jsonb,
    response jsonb, context jsonb, extra jsonb)

-- name: cost_workflow_steps
-- Usage and cost of one workflow, per step and model.
SELECT step_name, model, count(*) AS calls, sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens, sum(cached_tokens) AS cached_tokens,
    sum(cost) AS cost, count(*) FILTER (WHERE cost IS NULL) AS unpriced,
    sum(duration_ms) AS duration_ms
FROM {schema}.step_stats
WHERE workflow_id = %(id)s
GROUP BY step_name, model
ORDER BY step_name, model NULLS FIRST

-- name: cost_by_model
-- Usage and cost per model over a time range.
SELECT model, count(*) AS calls, sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens, sum(cached_tokens) AS cached_tokens,
    sum(cost) AS cost, count(*) FILTER (WHERE cost IS NULL) AS unpriced,
    sum(duration_ms) AS duration_ms
FROM {schema}.step_stats
WHERE inserted_at >= %(since)s AND inserted_at < %(until)s
GROUP BY model
ORDER BY sum(cost) DESC NULLS LAST, model

-- name: workflows_prune
-- Delete finished workflows older than %(max_age)s seconds with every row they own (nodes
-- and edges go by their foreign keys).
WITH doomed AS (
    SELECT id FROM {schema}.workflows
    WHERE finished_at < now() - make_interval(secs => %(max_age)s)
    ORDER BY finished_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), jobs_gone AS (
    DELETE FROM {schema}.jobs AS j USING doomed WHERE j.workflow_id = doomed.id RETURNING 1
), stats_gone AS (
    DELETE FROM {schema}.step_stats AS s USING doomed WHERE s.workflow_id = doomed.id
    RETURNING 1
), logs_gone AS (
    DELETE FROM {schema}.debug_logs AS d USING doomed WHERE d.workflow_id = doomed.id
    RETURNING 1
), settled_gone AS (
    DELETE FROM {schema}.completions AS c USING doomed WHERE c.workflow_id = doomed.id
), workflows_gone AS (
    DELETE FROM {schema}.workflows AS w USING doomed WHERE w.id = doomed.id RETURNING 1
)
SELECT (SELECT count(*) FROM workflows_gone), (SELECT count(*) FROM jobs_gone),
    (SELECT count(*) FROM stats_gone), (SELECT count(*) FROM logs_gone)

-- name: debug_logs_prune
WITH doomed AS (
    SELECT id FROM {schema}.debug_logs
    WHERE inserted_at < now() - make_interval(secs => %(max_age)s)
    ORDER BY inserted_at
    LIMIT %(limit)s
), deleted AS (
    DELETE FROM {schema}.debug_logs AS d USING doomed WHERE d.id = doomed.id RETURNING 1
)
SELECT count(*) FROM deleted

-- name: event_payloads_prune
-- Large event payloads are read within moments of their NOTIFY; keep them an hour.
WITH doomed AS (
    SELECT id FROM {schema}.event_payloads
    WHERE inserted_at < now() - interval '1 hour'
    ORDER BY id
    LIMIT %(limit)s
), deleted AS (
    DELETE FROM {schema}.event_payloads AS e USING doomed WHERE e.id = doomed.id RETURNING 1
)
SELECT count(*) FROM deleted
