-- Storage settings and batched event delivery, found by the benchmarks.

-- migrate:up
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

-- Every job changes state at least twice: vacuum the table early so the fetch index does
-- not fill with entries of rows that left it.
ALTER TABLE {schema}.jobs SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 1
);

-- migrate:down
ALTER TABLE {schema}.jobs RESET (
    autovacuum_vacuum_scale_factor,
    autovacuum_vacuum_insert_scale_factor,
    autovacuum_analyze_scale_factor,
    autovacuum_vacuum_cost_delay
);
DROP FUNCTION IF EXISTS {schema}.emit_many(text, jsonb);
