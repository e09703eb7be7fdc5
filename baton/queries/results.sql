-- Kept results of plain jobs and job listings. {schema} is the quoted schema name.

-- name: job_results_keep
-- Keep the results of plain jobs, in the completer's write after jobs_finish: only jobs that
-- finish completed in this transaction (finalized_at is its now()) keep theirs, so a job
-- cancelled or rescued meanwhile keeps nothing. A job run again replaces its result.
INSERT INTO {schema}.job_results (job_id, result)
SELECT r.job_id, COALESCE(r.result, 'null'::jsonb)
FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(job_id bigint, result jsonb)
JOIN {schema}.jobs AS j ON j.id = r.job_id
WHERE j.state = 'completed' AND j.finalized_at = now()
ON CONFLICT (job_id) DO UPDATE SET result = EXCLUDED.result, kept_at = EXCLUDED.kept_at

-- name: job_result_get
-- A job's state and its result: kept in job_results (a plain job) or in its node (a
-- workflow step). The job may be archived (jobs_all).
SELECT j.state, j.step, j.workflow_id,
    r.job_id IS NOT NULL AS kept, r.result,
    n.has_result AS step_has_result, n.result -> 'value' AS step_result
FROM {schema}.jobs_all AS j
LEFT JOIN {schema}.job_results AS r ON r.job_id = j.id
LEFT JOIN {schema}.nodes AS n ON n.job_id = j.id
WHERE j.id = %(id)s

-- name: jobs_list
-- Jobs newest first, by queue, state, step and tags (a job has every tag asked for); the
-- `tags <> '{}'` lets the partial indexes jobs_tags_idx and jobs_archive_tags_idx answer a
-- tag filter. Archived jobs included (jobs_all).
SELECT id, state, queue, step, attempt, max_attempts, tags, workflow_id, workflow_step,
    inserted_at, scheduled_at, finalized_at
FROM {schema}.jobs_all
WHERE (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(state)s::text IS NULL OR state = %(state)s::text)
  AND (%(step)s::text IS NULL OR step = %(step)s::text)
  AND (%(tags)s::text[] IS NULL OR (tags @> %(tags)s::text[] AND tags <> '{}'))
ORDER BY id DESC
LIMIT %(limit)s
