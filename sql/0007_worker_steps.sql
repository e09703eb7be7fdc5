-- Workers say which steps they can run: a worker fetches only those, and `baton status`
-- shows jobs that no live worker can run (an older deploy, a step defined in __main__).

-- migrate:up
ALTER TABLE {schema}.worker_registry ADD COLUMN IF NOT EXISTS steps text[];

COMMENT ON COLUMN {schema}.worker_registry.steps IS
    'The steps this worker can run (it fetches no other); NULL for a worker that does not '
    'say (it fetches every step).';

-- migrate:down
ALTER TABLE {schema}.worker_registry DROP COLUMN IF EXISTS steps;
