-- Workflows: DAGs of jobs. The engine's mutable state lives here, never in jobs rows.

-- migrate:up
CREATE TABLE IF NOT EXISTS {schema}.workflows (
    id               uuid        PRIMARY KEY,
    label            text        NOT NULL,
    state            text        NOT NULL DEFAULT 'running',
    ignore_cancelled boolean     NOT NULL DEFAULT false,
    ignore_discarded boolean     NOT NULL DEFAULT false,
    debug            boolean     NOT NULL DEFAULT false,
    total_steps      integer     NOT NULL,
    settled_steps    integer     NOT NULL DEFAULT 0,
    failed_steps     text[]      NOT NULL DEFAULT '{}',
    inserted_at      timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    CONSTRAINT workflows_state_check CHECK (state IN ('running', 'completed', 'failed')),
    CONSTRAINT workflows_finished_when_final CHECK ((state = 'running') = (finished_at IS NULL))
);

COMMENT ON TABLE {schema}.workflows IS
    'One row per workflow: its label, outcome (running, completed, failed) and failed steps.';

CREATE INDEX IF NOT EXISTS workflows_running_idx
    ON {schema}.workflows (inserted_at) WHERE finished_at IS NULL;
CREATE INDEX IF NOT EXISTS workflows_finished_idx
    ON {schema}.workflows (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS workflows_label_idx ON {schema}.workflows (label);

-- One row per step: its job, dependencies, and the result it returned.
CREATE TABLE IF NOT EXISTS {schema}.nodes (
    workflow_id      uuid        NOT NULL REFERENCES {schema}.workflows (id) ON DELETE CASCADE,
    name             text        NOT NULL,
    job_id           bigint      NOT NULL,
    step             text        NOT NULL,
    deps             text[]      NOT NULL DEFAULT '{}',
    group_name       text,
    model            text,
    ignore_cancelled boolean,
    ignore_discarded boolean,
    min_success      integer,
    pending_deps     integer     NOT NULL,
    result           jsonb,
    has_result       boolean     NOT NULL DEFAULT false,
    inserted_at      timestamptz NOT NULL DEFAULT now(),
    result_at        timestamptz,
    PRIMARY KEY (workflow_id, name)
);

COMMENT ON TABLE {schema}.nodes IS
    'One row per workflow step. result holds {"value": <what the step returned>}.';
COMMENT ON COLUMN {schema}.nodes.pending_deps IS
    'Dependencies not yet settled; the step is released when it reaches 0.';

CREATE UNIQUE INDEX IF NOT EXISTS nodes_job_idx ON {schema}.nodes (job_id);

-- The dependency edges, expanded (a group dependency becomes one edge per member).
-- The key serves a starting step reading its dependencies; the index serves a settling
-- step finding its dependents.
CREATE TABLE IF NOT EXISTS {schema}.edges (
    workflow_id uuid NOT NULL REFERENCES {schema}.workflows (id) ON DELETE CASCADE,
    node        text NOT NULL,
    dep         text NOT NULL,
    PRIMARY KEY (workflow_id, node, dep)
);

CREATE INDEX IF NOT EXISTS edges_dep_idx ON {schema}.edges (workflow_id, dep) INCLUDE (node);

-- Each step's settlement, recorded exactly once (the first writer wins).
CREATE TABLE IF NOT EXISTS {schema}.completions (
    workflow_id  uuid        NOT NULL REFERENCES {schema}.workflows (id) ON DELETE CASCADE,
    name         text        NOT NULL,
    outcome      text        NOT NULL,
    completed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, name),
    CONSTRAINT completions_outcome_check CHECK (outcome IN ('completed', 'discarded', 'cancelled'))
);

-- What a person asks first: every step of a workflow with its job's state.
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
    n.group_name
FROM {schema}.nodes AS n
JOIN {schema}.workflows AS w ON w.id = n.workflow_id
LEFT JOIN {schema}.jobs AS j ON j.id = n.job_id;

-- migrate:down
DROP VIEW IF EXISTS {schema}.workflow_steps;
DROP TABLE IF EXISTS {schema}.completions;
DROP TABLE IF EXISTS {schema}.edges;
DROP TABLE IF EXISTS {schema}.nodes;
DROP TABLE IF EXISTS {schema}.workflows;
