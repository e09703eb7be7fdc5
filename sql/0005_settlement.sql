-- Settlement without a foreign-key check per step.

-- migrate:up
-- Settlement writes a completions row for every step, under its workflow's lock, so the
-- workflow is known to exist; the per-row key check cost about a quarter of the statement.
-- Pruning deletes a workflow's completions with it, as it does its step stats and logs.
ALTER TABLE {schema}.completions DROP CONSTRAINT IF EXISTS completions_workflow_id_fkey;

-- migrate:down
DELETE FROM {schema}.completions AS c
WHERE NOT EXISTS (SELECT 1 FROM {schema}.workflows AS w WHERE w.id = c.workflow_id);
ALTER TABLE {schema}.completions
    ADD CONSTRAINT completions_workflow_id_fkey FOREIGN KEY (workflow_id)
    REFERENCES {schema}.workflows (id) ON DELETE CASCADE;
