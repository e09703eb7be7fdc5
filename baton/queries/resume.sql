-- Resuming a workflow: its discarded and cancelled steps run again. {schema} is the quoted
-- schema name. The statements run in one transaction, in this order.

-- name: workflow_lock_for_resume
-- Take the workflow's lock before any job row (as settlement does), and say which of
-- %(names)s (NULL: none asked) it has no step of. No row: there is no such workflow.
SELECT w.label, w.run, w.finished_at IS NOT NULL AS finished,
    ARRAY(SELECT a.name FROM unnest(%(names)s::text[]) WITH ORDINALITY AS a(name, ord)
          WHERE NOT EXISTS (SELECT 1 FROM {schema}.nodes AS n
                            WHERE n.workflow_id = w.id AND n.name = a.name)
          ORDER BY a.ord) AS unknown
FROM {schema}.workflows AS w
WHERE w.id = %(id)s
FOR UPDATE

-- name: workflow_resume_targets
-- The steps a resume runs again, their jobs locked: with %(names)s NULL, every step whose
-- job is discarded or cancelled, but for a failure settlement did not count against the
-- workflow (a quorum step completed without it); else the steps named and every step
-- downstream of them (by the edges, transitively) whose job is discarded or cancelled.
-- A job still executing is never one of them.
WITH RECURSIVE downstream (name) AS (
    SELECT unnest(%(names)s::text[])
    UNION
    SELECT e.node
    FROM {schema}.edges AS e
    JOIN downstream AS d ON e.workflow_id = %(id)s AND e.dep = d.name
)
SELECT n.name
FROM {schema}.nodes AS n
JOIN {schema}.workflows AS w ON w.id = n.workflow_id
JOIN {schema}.jobs AS j ON j.id = n.job_id
WHERE n.workflow_id = %(id)s
  AND j.state IN ('discarded', 'cancelled')
  AND CASE WHEN %(names)s::text[] IS NULL
           THEN n.name = ANY(w.failed_steps) OR NOT EXISTS (
               SELECT 1 FROM {schema}.completions AS c
               WHERE c.workflow_id = n.workflow_id AND c.name = n.name)
           ELSE n.name IN (SELECT name FROM downstream) END
ORDER BY n.name
FOR UPDATE OF j

-- name: workflow_resume
-- Run the steps %(names)s of workflow %(id)s again (found by workflow_resume_targets, under
-- the workflow's lock): forget their settlements; recount what each unsettled step waits
-- on (its dependencies without a settlement); make their jobs available, or pending while
-- they wait, with one more attempt allowed; reopen the workflow, as a new run if it had
-- finished, counting its settlements and keeping the failed steps settlement recorded
-- less those resumed; wake the queues of the jobs made available. Returns the steps made
-- runnable and the workflow's run.
WITH forgotten AS (
    DELETE FROM {schema}.completions AS c
    WHERE c.workflow_id = %(id)s AND c.name = ANY(%(names)s::text[])
    RETURNING c.name
), settled AS (
    SELECT c.name, c.outcome
    FROM {schema}.completions AS c
    WHERE c.workflow_id = %(id)s AND c.name <> ALL(%(names)s::text[])
), waits AS (
    SELECT n.name, n.job_id,
        (SELECT count(*) FROM {schema}.edges AS e
         WHERE e.workflow_id = n.workflow_id AND e.node = n.name
           AND NOT EXISTS (SELECT 1 FROM settled AS s WHERE s.name = e.dep))::integer
            AS pending
    FROM {schema}.nodes AS n
    WHERE n.workflow_id = %(id)s
      AND NOT EXISTS (SELECT 1 FROM settled AS s WHERE s.name = n.name)
), counted AS (
    UPDATE {schema}.nodes AS n
    SET pending_deps = waits.pending
    FROM waits
    WHERE n.workflow_id = %(id)s AND n.name = waits.name AND n.pending_deps <> waits.pending
    RETURNING n.name
), resumed AS (
    UPDATE {schema}.jobs AS j
    SET state = CASE WHEN waits.pending = 0 THEN 'available' ELSE 'pending' END,
        finalized_at = NULL,
        scheduled_at = now(),
        max_attempts = GREATEST(j.max_attempts, j.attempt + 1)
    FROM waits
    WHERE j.id = waits.job_id AND waits.name = ANY(%(names)s::text[])
      AND j.state IN ('discarded', 'cancelled')
    RETURNING waits.name, j.queue, j.state
), reopened AS (
    UPDATE {schema}.workflows AS w
    SET state = 'running',
        finished_at = NULL,
        settled_steps = (SELECT count(*) FROM settled),
        failed_steps = ARRAY(SELECT f.name FROM unnest(w.failed_steps) AS f(name)
                             WHERE f.name <> ALL(%(names)s::text[])),
        run = CASE WHEN w.finished_at IS NULL THEN w.run ELSE w.run + 1 END
    WHERE w.id = %(id)s
    RETURNING w.run
), woken AS (
    SELECT pg_notify(%(channel)s, q.queue)
    FROM (SELECT DISTINCT queue FROM resumed WHERE state = 'available') AS q
)
SELECT ARRAY(SELECT name FROM resumed ORDER BY name) AS steps,
    (SELECT run FROM reopened) AS run,
    (SELECT count(*) FROM woken) AS woken,
    (SELECT count(*) FROM counted) AS recounted,
    (SELECT count(*) FROM forgotten) AS forgotten
