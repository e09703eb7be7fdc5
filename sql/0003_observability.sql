-- Observability: live events over NOTIFY, LLM usage and cost, captured context.

-- migrate:up
-- Event payloads too large for NOTIFY (8000 bytes) are kept here and sent by reference.
CREATE TABLE IF NOT EXISTS {schema}.event_payloads (
    id          bigserial   PRIMARY KEY,
    payload     jsonb       NOT NULL,
    inserted_at timestamptz NOT NULL DEFAULT now()
);

-- Send one event on a channel, whole: inline when it fits, else by reference.
CREATE OR REPLACE FUNCTION {schema}.emit(channel text, payload jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    body text := payload::text;
    ref  bigint;
BEGIN
    IF octet_length(body) <= 7500 THEN
        PERFORM pg_notify(channel, body);
    ELSE
        INSERT INTO {schema}.event_payloads (payload) VALUES (payload) RETURNING id INTO ref;
        PERFORM pg_notify(channel, json_build_object('ref', ref)::text);
    END IF;
END
$$;

-- One row per recorded LLM call (or any usage a step reports).
CREATE TABLE IF NOT EXISTS {schema}.step_stats (
    id                 bigserial   PRIMARY KEY,
    workflow_id        uuid,
    step_name          text        NOT NULL,
    job_id             bigint,
    attempt            integer,
    model              text,
    input_tokens       integer     NOT NULL DEFAULT 0,
    output_tokens      integer     NOT NULL DEFAULT 0,
    cached_tokens      integer     NOT NULL DEFAULT 0,
    cache_write_tokens integer     NOT NULL DEFAULT 0,
    duration_ms        double precision,
    cost               numeric(18, 8),
    inserted_at        timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE {schema}.step_stats IS
    'Token usage and cost per step call; cost is NULL when the model has no price.';

CREATE INDEX IF NOT EXISTS step_stats_workflow_idx
    ON {schema}.step_stats (workflow_id, step_name) WHERE workflow_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS step_stats_time_idx ON {schema}.step_stats (inserted_at);

-- Full prompt/response capture, off unless switched on.
CREATE TABLE IF NOT EXISTS {schema}.debug_logs (
    id          bigserial   PRIMARY KEY,
    workflow_id uuid,
    step_name   text        NOT NULL,
    job_id      bigint,
    attempt     integer,
    request     jsonb,
    response    jsonb,
    context     jsonb,
    extra       jsonb       NOT NULL DEFAULT '{}',
    inserted_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS debug_logs_workflow_idx
    ON {schema}.debug_logs (workflow_id) WHERE workflow_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS debug_logs_time_idx ON {schema}.debug_logs (inserted_at);

-- migrate:down
DROP TABLE IF EXISTS {schema}.debug_logs;
DROP TABLE IF EXISTS {schema}.step_stats;
DROP FUNCTION IF EXISTS {schema}.emit(text, jsonb);
DROP TABLE IF EXISTS {schema}.event_payloads;
