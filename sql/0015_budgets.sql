-- Cost budgets for workflows: a limit on what the usage recorded by a workflow's steps (or
-- by one group of them) may cost; once it is reached, the steps in its scope that have not
-- started are cancelled. Every statement is idempotent; {schema} is the quoted schema.
--
-- Only budgeted workflows have rows here and values in the new columns: an ordinary
-- workflow's row gains two NULL columns (no space: rows already have a null bitmap) and
-- nothing reads this table on its path.

-- migrate:up
CREATE TABLE IF NOT EXISTS {schema}.budgets (
    workflow_id uuid           NOT NULL REFERENCES {schema}.workflows (id) ON DELETE CASCADE,
    scope       text           NOT NULL,
    budget_usd  numeric(18, 8) NOT NULL,
    spent_usd   numeric(18, 8) NOT NULL DEFAULT 0,
    exceeded_at timestamptz,
    PRIMARY KEY (workflow_id, scope),
    CONSTRAINT budgets_positive CHECK (budget_usd > 0)
);

COMMENT ON TABLE {schema}.budgets IS
    'Cost budgets of workflows, one row per scope: '''' for the whole workflow, else a '
    'fan-out group or sub-workflow name. spent_usd adds up the priced usage of the steps in '
    'scope; exceeded_at is when it reached budget_usd (NULL while it has room).';

ALTER TABLE {schema}.workflows ADD COLUMN IF NOT EXISTS spent_usd numeric(18, 8);
ALTER TABLE {schema}.workflows ADD COLUMN IF NOT EXISTS stop_reason text;

COMMENT ON COLUMN {schema}.workflows.spent_usd IS
    'What the priced usage of the steps of a workflow with a budget cost so far (NULL for a '
    'workflow without one: read step_stats).';
COMMENT ON COLUMN {schema}.workflows.stop_reason IS
    'Why steps of the workflow were stopped before they started: budget_exceeded, or NULL.';

-- migrate:down
ALTER TABLE {schema}.workflows DROP COLUMN IF EXISTS stop_reason;
ALTER TABLE {schema}.workflows DROP COLUMN IF EXISTS spent_usd;
DROP TABLE IF EXISTS {schema}.budgets;
