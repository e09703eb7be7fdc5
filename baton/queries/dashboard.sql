-- The dashboard's reads. Each one is answered by an index and bounded by a LIMIT or a time
-- window, so a page stays cheap on a jobs table of millions of rows; finished jobs are never
-- counted as a whole (their numbers come from a recent window of jobs_finalized_idx).

-- name: dashboard_queue_throughput
-- Jobs per queue that finished in the last %(seconds)s seconds, by how they finished: a
-- range of jobs_finalized_idx, never the whole table.
SELECT queue, state, count(*) AS jobs
FROM {schema}.jobs
WHERE finalized_at IS NOT NULL
  AND finalized_at >= COALESCE(%(now)s::timestamptz, now())
                      - make_interval(secs => %(seconds)s::double precision)
GROUP BY queue, state

-- name: dashboard_queue_settings
-- Every queue that was ever paused, resumed or scaled.
SELECT name, paused, concurrency, updated_at
FROM {schema}.queues
ORDER BY name

-- name: dashboard_jobs_page
-- One page of jobs, newest first, after the keyset %(before)s (an id; NULL for the first
-- page), archived ones included: the ids of jobs and of each jobs_archive partition are
-- walked backwards and merged; the filters are the listing's own.
SELECT id, state, queue, step, attempt, max_attempts, tags, workflow_id, workflow_step,
    inserted_at, scheduled_at, finalized_at, errors -> -1 ->> 'error' AS last_error
FROM {schema}.jobs_all
WHERE (%(before)s::bigint IS NULL OR id < %(before)s::bigint)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(state)s::text IS NULL OR state = %(state)s::text)
  AND (%(step)s::text IS NULL OR step = %(step)s::text)
  AND (%(tag)s::text IS NULL OR (tags @> ARRAY[%(tag)s::text] AND tags <> '{}'))
ORDER BY id DESC
LIMIT %(limit)s

-- name: dashboard_workflows_running
-- Running workflows, newest first, after the keyset (%(before_at)s, %(before_id)s):
-- workflows_running_idx.
SELECT id, label, state, total_steps, settled_steps, failed_steps, inserted_at, finished_at
FROM {schema}.workflows
WHERE finished_at IS NULL
  AND (%(label)s::text IS NULL OR label = %(label)s::text)
  AND (%(before_at)s::timestamptz IS NULL
       OR (inserted_at, id) < (%(before_at)s::timestamptz, %(before_id)s::uuid))
ORDER BY inserted_at DESC, id DESC
LIMIT %(limit)s

-- name: dashboard_workflows_finished
-- Finished workflows (completed, failed, or both when %(state)s is NULL), the last to
-- finish first, after the keyset (%(before_at)s, %(before_id)s): workflows_finished_idx.
SELECT id, label, state, total_steps, settled_steps, failed_steps, inserted_at, finished_at
FROM {schema}.workflows
WHERE finished_at IS NOT NULL
  AND (%(state)s::text IS NULL OR state = %(state)s::text)
  AND (%(label)s::text IS NULL OR label = %(label)s::text)
  AND (%(before_at)s::timestamptz IS NULL
       OR (finished_at, id) < (%(before_at)s::timestamptz, %(before_id)s::uuid))
ORDER BY finished_at DESC, id DESC
LIMIT %(limit)s

-- name: dashboard_workflow_steps
-- The steps of one workflow (nodes by key, each job by key), at most %(limit)s of them, as
-- baton.query.StepView reads them.
SELECT n.name AS step_name, n.step AS function, j.state, j.attempt, j.max_attempts, n.deps,
    n.model, n.has_result, j.errors -> -1 ->> 'error' AS last_error, n.job_id,
    j.attempted_at, j.finalized_at, n.group_name,
    (SELECT sum(st.cost) FROM {schema}.step_stats AS st
     WHERE st.workflow_id = n.workflow_id AND st.step_name = n.name) AS cost
FROM {schema}.nodes AS n
LEFT JOIN {schema}.jobs AS j ON j.id = n.job_id
WHERE n.workflow_id = %(id)s
ORDER BY n.job_id
LIMIT %(limit)s

-- name: dashboard_workflow_costs
-- What each step of one workflow spent, over all its calls (step_stats_workflow_idx).
SELECT step_name, sum(cost) AS cost, sum(input_tokens + output_tokens) AS tokens,
    count(*) FILTER (WHERE cost IS NULL) AS unpriced
FROM {schema}.step_stats
WHERE workflow_id = %(id)s
GROUP BY step_name

-- name: dashboard_step_get
-- One step of a workflow with its job and its result.
SELECT n.name AS step_name, n.step AS function, n.deps, n.model, n.group_name, n.job_id,
    n.has_result, n.result -> 'value' AS result, n.result_at
FROM {schema}.nodes AS n
WHERE n.workflow_id = %(id)s AND n.name = %(name)s

-- name: dashboard_step_stats
-- What one step's calls used and cost, attempt by attempt (step_stats_workflow_idx).
SELECT attempt, model, input_tokens, output_tokens, cached_tokens, duration_ms, cost,
    inserted_at
FROM {schema}.step_stats
WHERE workflow_id = %(id)s AND step_name = %(name)s
ORDER BY id
LIMIT %(limit)s

-- name: dashboard_step_logs
-- The context one step captured (debug_logs_workflow_idx), the latest first.
SELECT attempt, request, response, context, extra, inserted_at
FROM {schema}.debug_logs
WHERE workflow_id = %(id)s AND step_name = %(name)s
ORDER BY id DESC
LIMIT %(limit)s

-- name: workflow_unfinished_steps
-- The steps of a workflow that have not finished, to cancel them one by one.
SELECT n.name, n.job_id
FROM {schema}.nodes AS n
JOIN {schema}.jobs AS j ON j.id = n.job_id
WHERE n.workflow_id = %(id)s
  AND j.state NOT IN ('completed', 'discarded', 'cancelled')
ORDER BY n.job_id
