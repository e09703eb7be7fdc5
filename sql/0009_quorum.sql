-- A step that needs only a quorum of its dependencies (min_success) and completed absorbs
-- the failures of the others: they no longer fail the workflow, unless the step is strict.

-- migrate:up
ALTER TABLE {schema}.nodes ADD COLUMN IF NOT EXISTS strict boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN {schema}.nodes.strict IS
    'With min_success: the dependencies that failed still fail the workflow even though '
    'this step ran without them.';

-- migrate:down
ALTER TABLE {schema}.nodes DROP COLUMN IF EXISTS strict;
