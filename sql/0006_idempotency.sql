-- Idempotency keys: a client that lost the reply to its insert retries with the same key
-- and gets the one job. Every statement is idempotent; {schema} is the quoted schema name.

-- migrate:up
ALTER TABLE {schema}.jobs ADD COLUMN IF NOT EXISTS idempotency_key text;

COMMENT ON COLUMN {schema}.jobs.idempotency_key IS
    'The key the job was enqueued with, if any: at most one job has a given key.';

-- Enforces the key; only keyed jobs are in it, so the plain insert pays nothing.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency_key_idx
    ON {schema}.jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- migrate:down
DROP INDEX IF EXISTS {schema}.jobs_idempotency_key_idx;
ALTER TABLE {schema}.jobs DROP COLUMN IF EXISTS idempotency_key;
