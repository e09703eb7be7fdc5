-- Queries of the leader's workflow sweep. {schema} is the quoted schema name.

-- name: steps_orphaned
-- Backstop: held steps that a deleted dependency would hold for ever. A held step (job
-- pending) of a running workflow is orphaned when
--   - one of its edges names a dependency that no longer exists: its nodes row is gone
--     (the step's gate would cancel it for that at start), or its job row is gone before
--     it settled (it can never settle); or
--   - its pending_deps is greater than the number of its dependencies that still exist
--     (edge, nodes row and job row) and have not settled (no completions row): an edge was
--     deleted, so no settlement will ever count the step down to 0.
-- A held step whose dependencies all exist, settled or not, is never orphaned.
-- Only quiet workflows are searched: none of their jobs is available, scheduled,
-- retryable or executing. A workflow with an orphaned step can never finish, so it turns
-- quiet once the rest of it has run, and its outcome is the same. A pass then costs one
-- index probe per running workflow instead of a few lookups per edge of every held step:
-- 180 ms for 15,000 held steps without the filter; with it, 20-30 ms for 5,000 running
-- workflows among 1.3 million jobs, about what nodes_stranded costs there.
WITH quiet AS MATERIALIZED (
    SELECT w.id
    FROM {schema}.workflows AS w
    -- LIMIT 1 keeps this a probe per workflow: as an anti-join the planner may read every
    -- workflow job of the table.
    LEFT JOIN LATERAL (
        SELECT true AS busy FROM {schema}.jobs AS a
        WHERE a.workflow_id = w.id
          AND a.state IN ('available', 'scheduled', 'retryable', 'executing')
        LIMIT 1
    ) AS a ON true
    WHERE w.finished_at IS NULL AND a.busy IS NULL
)
SELECT n.workflow_id, n.name
FROM quiet AS q
JOIN {schema}.nodes AS n ON n.workflow_id = q.id
JOIN {schema}.jobs AS j ON j.id = n.job_id
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE d.name IS NULL OR (dj.id IS NULL AND c.name IS NULL))
               AS gone,
           count(*) FILTER (WHERE dj.id IS NOT NULL AND c.name IS NULL) AS waiting
    FROM {schema}.edges AS e
    LEFT JOIN {schema}.nodes AS d ON d.workflow_id = e.workflow_id AND d.name = e.dep
    LEFT JOIN {schema}.jobs AS dj ON dj.id = d.job_id
    LEFT JOIN {schema}.completions AS c ON c.workflow_id = e.workflow_id AND c.name = e.dep
    WHERE e.workflow_id = n.workflow_id AND e.node = n.name
) AS deps
WHERE j.state = 'pending' AND (deps.gone > 0 OR n.pending_deps > deps.waiting)
LIMIT %(limit)s

-- name: steps_orphaned_cancel
-- Cancel up to %(limit)s orphaned held steps (as steps_orphaned defines them, quiet or
-- not) of the running workflows %(workflow_ids)s; run after workflows_lock on those
-- workflows. Each gets an errors entry naming the dependency that is gone. A gone
-- dependency of theirs that never settled is recorded as settled (cancelled) and counted
-- among its workflow's settled and failed steps, since nothing else ever will, so the
-- workflow can finish. It never finishes here: the cancelled steps are still to settle,
-- which the caller does next (steps_settle).
WITH orphaned AS (
    SELECT n.workflow_id, n.name, n.job_id, n.deps
    FROM {schema}.nodes AS n
    JOIN {schema}.workflows AS w ON w.id = n.workflow_id
    JOIN {schema}.jobs AS j ON j.id = n.job_id
    CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE d.name IS NULL OR (dj.id IS NULL AND c.name IS NULL))
                   AS gone,
               count(*) FILTER (WHERE dj.id IS NOT NULL AND c.name IS NULL) AS waiting
        FROM {schema}.edges AS e
        LEFT JOIN {schema}.nodes AS d ON d.workflow_id = e.workflow_id AND d.name = e.dep
        LEFT JOIN {schema}.jobs AS dj ON dj.id = d.job_id
        LEFT JOIN {schema}.completions AS c
            ON c.workflow_id = e.workflow_id AND c.name = e.dep
        WHERE e.workflow_id = n.workflow_id AND e.node = n.name
    ) AS deps
    WHERE w.finished_at IS NULL AND j.state = 'pending'
      AND n.workflow_id = ANY(%(workflow_ids)s::uuid[])
      AND (deps.gone > 0 OR n.pending_deps > deps.waiting)
    LIMIT %(limit)s
), gone AS (
    -- The dependencies of each step that no longer exist, by name.
    SELECT o.workflow_id, o.name AS node, e.dep, c.name IS NOT NULL AS settled
    FROM orphaned AS o
    JOIN {schema}.edges AS e ON e.workflow_id = o.workflow_id AND e.node = o.name
    LEFT JOIN {schema}.nodes AS d ON d.workflow_id = e.workflow_id AND d.name = e.dep
    LEFT JOIN {schema}.jobs AS dj ON dj.id = d.job_id
    LEFT JOIN {schema}.completions AS c ON c.workflow_id = e.workflow_id AND c.name = e.dep
    WHERE d.name IS NULL OR (dj.id IS NULL AND c.name IS NULL)
), named AS (
    -- Which dependency each step's error names: the first that is gone; else the first it
    -- declared that no edge stands for any more (its edge was deleted); else none.
    SELECT o.workflow_id, o.name, o.job_id, COALESCE(
        (SELECT min(g.dep) FROM gone AS g
         WHERE g.workflow_id = o.workflow_id AND g.node = o.name),
        (SELECT x.dep FROM unnest(o.deps) WITH ORDINALITY AS x(dep, ord)
         WHERE NOT EXISTS (
             SELECT 1 FROM {schema}.edges AS e
             LEFT JOIN {schema}.nodes AS m ON m.workflow_id = e.workflow_id AND m.name = e.dep
             WHERE e.workflow_id = o.workflow_id AND e.node = o.name
               AND (e.dep = x.dep OR m.group_name = x.dep))
         ORDER BY x.ord
         LIMIT 1)) AS dep
    FROM orphaned AS o
), cancelled AS (
    UPDATE {schema}.jobs AS j
    SET state = 'cancelled', finalized_at = now(),
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempt, 'at', now(), 'kind', 'workflow',
            'error', CASE WHEN named.dep IS NULL
                          THEN 'a dependency no longer exists (pruned)'
                          ELSE 'dependency ''' || named.dep || ''' no longer exists (pruned)'
                     END))
    FROM named
    WHERE j.id = named.job_id AND j.state = 'pending'
    RETURNING j.workflow_id, j.workflow_step, j.step, j.id AS job_id, j.attempt,
        j.errors -> -1 ->> 'error' AS error
), recorded AS (
    INSERT INTO {schema}.completions (workflow_id, name, outcome)
    SELECT DISTINCT g.workflow_id, g.dep, 'cancelled'
    FROM gone AS g
    JOIN cancelled AS c ON c.workflow_id = g.workflow_id AND c.workflow_step = g.node
    WHERE NOT g.settled
    ON CONFLICT DO NOTHING
    RETURNING workflow_id, name
), counted AS (
    UPDATE {schema}.workflows AS w
    SET settled_steps = w.settled_steps + r.n, failed_steps = w.failed_steps || r.names
    FROM (SELECT workflow_id, count(*)::integer AS n, array_agg(name ORDER BY name) AS names
          FROM recorded GROUP BY workflow_id) AS r
    WHERE w.id = r.workflow_id AND w.finished_at IS NULL
    RETURNING w.id
)
SELECT c.workflow_id, c.workflow_step, c.step, c.job_id, c.attempt, c.error, w.label
FROM cancelled AS c
JOIN {schema}.workflows AS w ON w.id = c.workflow_id
ORDER BY c.workflow_id, c.workflow_step
