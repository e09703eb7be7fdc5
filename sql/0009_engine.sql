-- The workflow engine in one place: a quorum step may absorb failures, and the step view
-- names the function a step runs as `function` (the `worker` column stays for readers of
-- older versions).

-- migrate:up
ALTER TABLE {schema}.nodes ADD COLUMN IF NOT EXISTS strict boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN {schema}.nodes.strict IS
    'With min_success: the dependencies that failed still fail the workflow even though '
    'this step ran without them.';

CREATE OR REPLACE VIEW {schema}.workflow_steps AS
SELECT
    n.workflow_id,
    w.label        AS workflow_label,
    n.name         AS step_name,
    n.step         AS worker,
    j.state,
    j.attempt,
    j.max_attempts,
    n.deps,
    n.model,
    n.has_result,
    n.result -> 'value' AS result,
    j.errors -> -1 ->> 'error' AS last_error,
    j.attempted_at,
    j.finalized_at,
    n.job_id,
    n.group_name,
    n.step         AS function
FROM {schema}.nodes AS n
JOIN {schema}.workflows AS w ON w.id = n.workflow_id
LEFT JOIN {schema}.jobs AS j ON j.id = n.job_id;

COMMENT ON COLUMN {schema}.workflow_steps.function IS
    'The registered step function the step runs (step_name is its name in the workflow).';

-- migrate:down
DROP VIEW IF EXISTS {schema}.workflow_steps;
CREATE VIEW {schema}.workflow_steps AS
SELECT
    n.workflow_id,
    w.label        AS workflow_label,
    n.name         AS step_name,
    n.step         AS worker,
    j.state,
    j.attempt,
    j.max_attempts,
    n.deps,
    n.model,
    n.has_result,
    n.result -> 'value' AS result,
    j.errors -> -1 ->> 'error' AS last_error,
    j.attempted_at,
    j.finalized_at,
    n.job_id,
    n.group_name
FROM {schema}.nodes AS n
JOIN {schema}.workflows AS w ON w.id = n.workflow_id
LEFT JOIN {schema}.jobs AS j ON j.id = n.job_id;
ALTER TABLE {schema}.nodes DROP COLUMN IF EXISTS strict;
