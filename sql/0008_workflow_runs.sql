-- Workflow runs: a failed workflow that is resumed runs again, and each run ends with its
-- own workflow_finished event. Every statement is idempotent; {schema} is the quoted schema.

-- migrate:up
ALTER TABLE {schema}.workflows ADD COLUMN IF NOT EXISTS run integer NOT NULL DEFAULT 1;

COMMENT ON COLUMN {schema}.workflows.run IS
    'The run of the workflow, from 1: a resume of a finished workflow starts the next one. '
    'Each run ends with one workflow_finished event, which carries its number.';

-- migrate:down
ALTER TABLE {schema}.workflows DROP COLUMN IF EXISTS run;
