-- Cost budgets of workflows (migration 0015). {schema} is the quoted schema name. A
-- budget's scope is '' for the whole workflow, else the name of a fan-out group (its
-- copies: nodes.group_name) or of a sub-workflow (its steps: named '<scope>.<step>').

-- name: budgets_insert
-- Keep the budgets of a workflow being inserted (or grown), and start counting what its
-- steps spend (a workflow grown may have spent before it had a budget).
WITH tracked AS (
    UPDATE {schema}.workflows AS w
    SET spent_usd = COALESCE(w.spent_usd, (SELECT COALESCE(sum(st.cost), 0)
                                           FROM {schema}.step_stats AS st
                                           WHERE st.workflow_id = w.id))
    WHERE w.id = %(workflow_id)s
    RETURNING w.id
)
INSERT INTO {schema}.budgets (workflow_id, scope, budget_usd)
SELECT tracked.id, t.scope, t.budget_usd
FROM tracked, jsonb_to_recordset(%(rows)s::jsonb) AS t(scope text, budget_usd numeric)
ON CONFLICT (workflow_id, scope) DO UPDATE SET budget_usd = EXCLUDED.budget_usd

-- name: budgets_charge
-- Charge the priced usage of a write (%(charges)s: workflow_id, step_name, cost) to the
-- budgets of its steps, and stop the steps of every budget reached: in %(workflow_ids)s'
-- workflows, a step in the scope of a reached budget (reached now, or before: a step of it
-- came back to run again) whose job has not started is cancelled, its error entry saying
-- so. Run under workflows_lock of those workflows, after the finish; the steps stopped are
-- returned for settlement (and their events), which is left to the caller.
WITH charge AS (
    SELECT t.workflow_id, t.step_name, n.group_name, t.cost
    FROM jsonb_to_recordset(%(charges)s::jsonb)
        AS t(workflow_id uuid, step_name text, cost numeric)
    JOIN {schema}.nodes AS n ON n.workflow_id = t.workflow_id AND n.name = t.step_name
), due AS (
    SELECT b.workflow_id, b.scope, sum(c.cost) AS cost
    FROM charge AS c
    JOIN {schema}.budgets AS b ON b.workflow_id = c.workflow_id
        AND (b.scope = '' OR b.scope = c.group_name OR starts_with(c.step_name, b.scope || '.'))
    GROUP BY b.workflow_id, b.scope
), charged AS (
    UPDATE {schema}.budgets AS b
    SET spent_usd = b.spent_usd + due.cost,
        exceeded_at = COALESCE(b.exceeded_at,
                               CASE WHEN b.spent_usd + due.cost >= b.budget_usd THEN now() END)
    FROM due
    WHERE b.workflow_id = due.workflow_id AND b.scope = due.scope
    RETURNING b.workflow_id, b.scope, b.budget_usd, b.spent_usd, b.exceeded_at
), reached AS (
    SELECT workflow_id, scope, budget_usd, spent_usd
    FROM charged WHERE exceeded_at IS NOT NULL
    UNION ALL
    SELECT b.workflow_id, b.scope, b.budget_usd, b.spent_usd
    FROM {schema}.budgets AS b
    WHERE b.workflow_id = ANY(%(workflow_ids)s::uuid[]) AND b.exceeded_at IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM charged AS c
                      WHERE c.workflow_id = b.workflow_id AND c.scope = b.scope)
), doomed AS (
    -- A step in two reached scopes is stopped once, by the widest ('' sorts first).
    SELECT DISTINCT ON (n.job_id) n.job_id, r.workflow_id,
        'budget_exceeded: ' || CASE WHEN r.scope = '' THEN 'the workflow'
                                    ELSE quote_literal(r.scope) END
            || ' spent $' || trim_scale(r.spent_usd) || ' of its $'
            || trim_scale(r.budget_usd) || ' budget' AS reason
    FROM reached AS r
    JOIN {schema}.nodes AS n ON n.workflow_id = r.workflow_id
        AND (r.scope = '' OR n.group_name = r.scope OR starts_with(n.name, r.scope || '.'))
    JOIN {schema}.jobs AS j ON j.id = n.job_id
    WHERE j.state IN ('pending', 'available', 'scheduled', 'retryable')
    ORDER BY n.job_id, r.scope
), stopped AS (
    UPDATE {schema}.jobs AS j
    SET state = 'cancelled', finalized_at = now(),
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempt, 'at', now(), 'kind', 'budget', 'error', d.reason))
    FROM doomed AS d
    WHERE j.id = d.job_id AND j.state IN ('pending', 'available', 'scheduled', 'retryable')
    RETURNING j.id, j.workflow_id, j.workflow_step, j.step, j.attempt, d.reason
), tracked AS (
    UPDATE {schema}.workflows AS w
    SET spent_usd = w.spent_usd + COALESCE(
            (SELECT sum(c.cost) FROM charge AS c WHERE c.workflow_id = w.id), 0),
        stop_reason = CASE WHEN EXISTS (SELECT 1 FROM stopped AS s WHERE s.workflow_id = w.id)
                           THEN 'budget_exceeded' ELSE w.stop_reason END
    WHERE w.id IN (SELECT workflow_id FROM charge UNION SELECT workflow_id FROM stopped)
      AND w.spent_usd IS NOT NULL
    RETURNING w.id, w.label
)
SELECT s.workflow_id, s.workflow_step, s.step, s.id AS job_id, s.attempt, s.reason,
    w.label
FROM stopped AS s
JOIN {schema}.workflows AS w ON w.id = s.workflow_id

-- name: budget_set
-- Set (raise or lower) one budget of a workflow: what its scope spent is counted again from
-- step_stats, and it is reached or has room by the new amount. Run after workflows_lock.
-- No row: the workflow has no step in that scope.
WITH spent AS (
    SELECT COALESCE(sum(st.cost), 0) AS total,
        COALESCE(sum(st.cost) FILTER (
            WHERE %(scope)s::text = '' OR n.group_name = %(scope)s::text
               OR starts_with(st.step_name, %(scope)s::text || '.')), 0) AS scoped
    FROM {schema}.step_stats AS st
    LEFT JOIN {schema}.nodes AS n
        ON n.workflow_id = st.workflow_id AND n.name = st.step_name
    WHERE st.workflow_id = %(workflow_id)s
), target AS (
    SELECT w.id FROM {schema}.workflows AS w
    WHERE w.id = %(workflow_id)s AND (%(scope)s::text = '' OR EXISTS (
        SELECT 1 FROM {schema}.nodes AS n
        WHERE n.workflow_id = w.id AND (n.group_name = %(scope)s::text
                                        OR starts_with(n.name, %(scope)s::text || '.'))))
), tracked AS (
    UPDATE {schema}.workflows AS w SET spent_usd = spent.total
    FROM spent, target
    WHERE w.id = target.id
    RETURNING w.id
)
INSERT INTO {schema}.budgets AS b (workflow_id, scope, budget_usd, spent_usd, exceeded_at)
SELECT tracked.id, %(scope)s::text, %(budget_usd)s::numeric, spent.scoped,
    CASE WHEN spent.scoped >= %(budget_usd)s::numeric THEN now() END
FROM tracked, spent
ON CONFLICT (workflow_id, scope) DO UPDATE
SET budget_usd = EXCLUDED.budget_usd, spent_usd = EXCLUDED.spent_usd,
    exceeded_at = CASE WHEN EXCLUDED.spent_usd >= EXCLUDED.budget_usd
                       THEN COALESCE(b.exceeded_at, now()) END
RETURNING b.spent_usd, b.exceeded_at IS NOT NULL AS reached

-- name: budgets_of_workflow
-- A workflow's budgets, widest first.
SELECT scope, budget_usd, spent_usd, exceeded_at
FROM {schema}.budgets
WHERE workflow_id = %(workflow_id)s
ORDER BY scope

-- name: budgets_blocking
-- The reached budgets of workflow %(workflow_id)s whose scope holds one of the steps
-- %(names)s: a resume of those steps would spend past them.
SELECT DISTINCT b.scope, b.budget_usd, b.spent_usd
FROM {schema}.budgets AS b
JOIN {schema}.nodes AS n ON n.workflow_id = b.workflow_id
    AND (b.scope = '' OR n.group_name = b.scope OR starts_with(n.name, b.scope || '.'))
WHERE b.workflow_id = %(workflow_id)s AND b.exceeded_at IS NOT NULL
  AND n.name = ANY(%(names)s::text[])
ORDER BY b.scope

-- name: workflow_stop_reason_clear
-- A finished workflow resumed starts a new run: why the last one stopped steps is forgotten.
UPDATE {schema}.workflows SET stop_reason = NULL
WHERE id = %(id)s AND stop_reason IS NOT NULL
