-- 0040: the per-batch statements of ingest as functions, one call each instead of a
-- dozen statements (and two waits for the server inside the transaction) per batch.
--
-- With small batches (a fleet of agents sending every few seconds) ingest's cost per batch
-- was mostly the statements themselves: a client round of encoding, sending and reading per
-- statement, the server's parse/bind/execute per statement, and two reads inside the
-- transaction (the batch key and the agent's sequence row) each waiting for the server.
-- These functions run exactly the statements ingest ran, in the same order and in the
-- caller's transaction (SECURITY INVOKER: the ingest role's grants and row policies apply as
-- before); PL/pgSQL keeps their plans per session.
--
-- ops.claim_batch: the batch key, and the events when the key is new (else 'duplicate' when
--   the stored batch has this digest, 'conflict' otherwise; nothing is written then).
-- ops.finish_batch: the (agent, epoch) sequence row (locked until commit: the batches of one
--   agent pass one at a time from here), the gap it opens or fills, the equipment the batch
--   names and the agent's last-seen row. Returns the gap opened, if any.
-- ops.store_batch: both for one batch, 'stored' only when the key was new.
-- ops.resolve_seq_gap: a seq inside an open gap is filled or declared; what remains of the
--   gap is opened again with its detection time.

CREATE FUNCTION ops.resolve_seq_gap(
    p_site text, p_agent text, p_epoch text, p_seq bigint, p_resolution text
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    g record;
BEGIN
    SELECT id, first_seq, last_seq, detected_at INTO g FROM ops.seq_gaps
    WHERE site_id = p_site AND agent_id = p_agent AND epoch = p_epoch AND resolved_at IS NULL
        AND first_seq <= p_seq AND last_seq >= p_seq
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE ops.seq_gaps SET resolved_at = now(), resolution = p_resolution
    WHERE site_id = p_site AND id = g.id;
    IF g.first_seq <= p_seq - 1 THEN
        INSERT INTO ops.seq_gaps(site_id, agent_id, epoch, first_seq, last_seq, detected_at)
        VALUES (p_site, p_agent, p_epoch, g.first_seq, p_seq - 1, g.detected_at);
    END IF;
    IF p_seq + 1 <= g.last_seq THEN
        INSERT INTO ops.seq_gaps(site_id, agent_id, epoch, first_seq, last_seq, detected_at)
        VALUES (p_site, p_agent, p_epoch, p_seq + 1, g.last_seq, g.detected_at);
    END IF;
    RETURN true;
END
$$;

CREATE FUNCTION ops.claim_batch(
    p_site text, p_agent text, p_epoch text, p_seq bigint, p_digest text, p_count integer,
    p_created timestamptz, p_trace text, p_events jsonb
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_stored text;
BEGIN
    INSERT INTO facts.batches(site_id, agent_id, epoch, seq, digest, event_count, created,
        trace_id)
    VALUES (p_site, p_agent, p_epoch, p_seq, p_digest, p_count, p_created, p_trace)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        SELECT digest INTO v_stored FROM facts.batches
        WHERE site_id = p_site AND agent_id = p_agent AND epoch = p_epoch AND seq = p_seq;
        RETURN CASE WHEN v_stored = p_digest THEN 'duplicate' ELSE 'conflict' END;
    END IF;
    -- The events of the batch from its JSON array (the normalized events ingest dumped),
    -- an event id stored before is dropped.
    INSERT INTO facts.events (site_id, ts, event_id, agent_id, epoch, seq, equipment_id, kind,
        body, trace_id)
    SELECT p_site, (e->>'ts')::timestamptz, (e->>'event_id')::uuid, p_agent, p_epoch, p_seq,
        e->>'equipment_id', e->>'kind', e, p_trace
    FROM jsonb_array_elements(p_events) AS t(e)
    ON CONFLICT DO NOTHING;
    RETURN 'stored';
END
$$;

CREATE FUNCTION ops.finish_batch(
    p_site text, p_agent text, p_epoch text, p_seq bigint, p_created timestamptz,
    p_equipment text[]
) RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    v_previous bigint;
    v_opened bigint[];
BEGIN
    INSERT INTO ops.agent_epochs(agent_id, epoch, site_id) VALUES (p_agent, p_epoch, p_site)
    ON CONFLICT DO NOTHING;
    SELECT max_seq INTO v_previous FROM ops.agent_epochs
    WHERE site_id = p_site AND agent_id = p_agent AND epoch = p_epoch
    FOR UPDATE;
    v_previous := coalesce(v_previous, 0);
    IF p_seq > v_previous + 1 THEN
        v_opened := ARRAY[v_previous + 1, p_seq - 1];
        INSERT INTO ops.seq_gaps(site_id, agent_id, epoch, first_seq, last_seq)
        VALUES (p_site, p_agent, p_epoch, v_previous + 1, p_seq - 1);
    ELSIF p_seq <= v_previous THEN
        PERFORM ops.resolve_seq_gap(p_site, p_agent, p_epoch, p_seq, 'filled');
        DELETE FROM ops.declared_losses
        WHERE site_id = p_site AND agent_id = p_agent AND epoch = p_epoch AND seq = p_seq;
    END IF;
    UPDATE ops.agent_epochs
    SET max_seq = GREATEST(max_seq, p_seq), batches = batches + 1, last_seen = now()
    WHERE site_id = p_site AND agent_id = p_agent AND epoch = p_epoch;
    -- The equipment the batch names (sorted by the caller: a stable lock order).
    IF cardinality(p_equipment) > 0 THEN
        INSERT INTO registry.equipment(site_id, equipment_id, agent_id)
        SELECT p_site, e, p_agent FROM unnest(p_equipment) AS t(e)
        ON CONFLICT (site_id, equipment_id) DO UPDATE
        SET agent_id = excluded.agent_id, updated_at = now()
        WHERE registry.equipment.agent_id IS DISTINCT FROM excluded.agent_id;
    END IF;
    UPDATE registry.agents
    SET last_seen = now(), last_batch_created = GREATEST(last_batch_created, p_created)
    WHERE agent_id = p_agent;
    RETURN v_opened;
END
$$;

CREATE FUNCTION ops.store_batch(
    p_site text, p_agent text, p_epoch text, p_seq bigint, p_digest text, p_count integer,
    p_created timestamptz, p_trace text, p_events jsonb, p_equipment text[],
    OUT result text, OUT opened bigint[]
) LANGUAGE plpgsql AS $$
BEGIN
    result := ops.claim_batch(p_site, p_agent, p_epoch, p_seq, p_digest, p_count, p_created,
        p_trace, p_events);
    IF result = 'stored' THEN
        opened := ops.finish_batch(p_site, p_agent, p_epoch, p_seq, p_created, p_equipment);
    END IF;
END
$$;
