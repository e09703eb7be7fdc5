-- Observability: live events over NOTIFY, LLM usage and cost, captured context.

-- migrate:up
-- Event payloads too large for NOTIFY (8000 bytes) are kept here and sent by reference.
CREATE TABLE IF NOT EXISTS {schema}.event_payloads (
    id          bigserial   PRIMARY KEY,
    payload     jsonb       NOT NULL,
    inserted_at timestamptz NOT NULL DEFAULT now()
);

-- Send many events in as few notifications as fit: each NOTIFY carries a JSON array of
-- events; an event too large for one goes to event_payloads and travels as {"ref": id}.
CREATE OR REPLACE FUNCTION {schema}.emit_many(channel text, payloads jsonb) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    item  jsonb;
    body  text;
    buf   text := '';
    ref   bigint;
    sent  integer := 0;
BEGIN
    FOR item IN SELECT value FROM jsonb_array_elements(payloads) LOOP
        body := item::text;
        IF octet_length(body) > 7000 THEN
            INSERT INTO {schema}.event_payloads (payload) VALUES (item) RETURNING id INTO ref;
            body := json_build_object('ref', ref)::text;
        END IF;
        IF buf <> '' AND octet_length(buf) + octet_length(body) > 7400 THEN
            PERFORM pg_notify(channel, '[' || buf || ']');
            sent := sent + 1;
            buf := '';
        END IF;
        buf := CASE WHEN buf = '' THEN body ELSE buf || ',' || body END;
    END LOOP;
    IF buf <> '' THEN
        PERFORM pg_notify(channel, '[' || buf || ']');
        sent := sent + 1;
    END IF;
    RETURN sent;
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
DROP FUNCTION IF EXISTS {schema}.emit_many(text, jsonb);
DROP TABLE IF EXISTS {schema}.event_payloads;
