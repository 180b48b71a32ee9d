-- 0041: a small batch stored by one statement that is its own transaction.
--
-- With the functions of 0040 a batch still took BEGIN, the store_batch call, the statement
-- of its OEE buckets (their JSON dumped by ingest a second time), COMMIT, and the client's
-- pipeline around them. ops.ingest_batch does all of it in one call, run by ingest outside
-- an explicit transaction: the call is one implicit transaction, committed before its
-- result reaches ingest (so an ack still follows the commit), rolled back whole on any
-- error. Same statements, same order as before (batch key, events, the agent's sequence
-- row, equipment and last-seen, then the buckets with their rollups and data versions,
-- then the agent's status report).
--
-- ops.store_buckets: the OEE buckets among a JSON array of events (kind 'oee'; the events
--   ingest dumped from its validated models), the statement ingest sent with the buckets'
--   own JSON array: the buckets that are new go into facts and, exactly those (RETURNING),
--   into the minute and hour rollups; every (site, equipment, UTC day) they touch gets a
--   new data version.
-- ops.ingest_batch: what ops.store_batch does, then (only when the batch was stored) its
--   buckets and the newest status report of the batch when ingest passes one (p_status:
--   the report's kept keys, p_version, p_status_ts: its time; the newest report wins, as
--   before).
--   Batches with configuration reports or loss records take ingest's other path.

CREATE FUNCTION ops.store_buckets(p_events jsonb) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    WITH b AS (
        SELECT e->>'site_id' AS site_id, e->>'equipment_id' AS equipment_id,
            (e->>'bucket_start')::timestamptz AS bucket_start,
            (e->>'bucket_end')::timestamptz AS bucket_end,
            (e->>'event_id')::uuid AS event_id, e->>'shift' AS shift,
            (e->>'shift_start')::timestamptz AS shift_start,
            (e->'components'->>'planned_busy_s')::double precision AS planned_busy_s,
            (e->'components'->>'production_s')::double precision AS production_s,
            (e->'components'->>'setup_s')::double precision AS setup_s,
            (e->'components'->>'downtime_s')::double precision AS downtime_s,
            (e->'components'->>'fault_s')::double precision AS fault_s,
            (e->'components'->>'idle_s')::double precision AS idle_s,
            (e->'components'->>'micro_stop_s')::double precision AS micro_stop_s,
            (e->'components'->>'unknown_s')::double precision AS unknown_s,
            (e->'components'->>'planned_down_s')::double precision AS planned_down_s,
            (e->'components'->>'off_plan_s')::double precision AS off_plan_s,
            (e->'components'->>'produced')::bigint AS produced,
            (e->'components'->>'good')::bigint AS good,
            (e->'components'->>'scrap')::bigint AS scrap,
            (e->'components'->>'rework')::bigint AS rework,
            (e->'components'->>'off_plan_produced')::bigint AS off_plan_produced,
            (e->'components'->>'ideal_produced_s')::double precision AS ideal_produced_s,
            (e->'components'->>'ideal_good_s')::double precision AS ideal_good_s,
            (e->'components'->>'fault_stops')::bigint AS fault_stops,
            (e->'components'->>'micro_stops')::bigint AS micro_stops,
            e->'downtime_by_reason' AS downtime_by_reason
        FROM jsonb_array_elements(p_events) AS t(e)
        WHERE e->>'kind' = 'oee'
    ), inserted AS (
        INSERT INTO facts.oee_buckets (site_id, equipment_id, bucket_start, bucket_end,
            event_id, shift, shift_start, planned_busy_s, production_s, setup_s, downtime_s,
            fault_s, idle_s, micro_stop_s, unknown_s, planned_down_s, off_plan_s, produced,
            good, scrap, rework, off_plan_produced, ideal_produced_s, ideal_good_s,
            fault_stops, micro_stops, downtime_by_reason)
        SELECT site_id, equipment_id, bucket_start, bucket_end, event_id, shift, shift_start,
            planned_busy_s, production_s, setup_s, downtime_s, fault_s, idle_s, micro_stop_s,
            unknown_s, planned_down_s, off_plan_s, produced, good, scrap, rework,
            off_plan_produced, ideal_produced_s, ideal_good_s, fault_stops, micro_stops,
            downtime_by_reason
        FROM b
        ON CONFLICT DO NOTHING
        RETURNING *
    ), minute AS (
        INSERT INTO rollups.oee_1m AS r (site_id, equipment_id, bucket, planned_busy_s,
            production_s, setup_s, downtime_s, fault_s, idle_s, micro_stop_s, unknown_s,
            planned_down_s, off_plan_s, produced, good, scrap, rework, off_plan_produced,
            ideal_produced_s, ideal_good_s, fault_stops, micro_stops)
        SELECT site_id, equipment_id, date_trunc('minute', bucket_start), sum(planned_busy_s),
            sum(production_s), sum(setup_s), sum(downtime_s), sum(fault_s), sum(idle_s),
            sum(micro_stop_s), sum(unknown_s), sum(planned_down_s), sum(off_plan_s),
            sum(produced), sum(good), sum(scrap), sum(rework), sum(off_plan_produced),
            sum(ideal_produced_s), sum(ideal_good_s), sum(fault_stops), sum(micro_stops)
        FROM inserted GROUP BY 1, 2, 3
        ON CONFLICT (site_id, equipment_id, bucket) DO UPDATE SET
            planned_busy_s = r.planned_busy_s + excluded.planned_busy_s,
            production_s = r.production_s + excluded.production_s,
            setup_s = r.setup_s + excluded.setup_s,
            downtime_s = r.downtime_s + excluded.downtime_s,
            fault_s = r.fault_s + excluded.fault_s,
            idle_s = r.idle_s + excluded.idle_s,
            micro_stop_s = r.micro_stop_s + excluded.micro_stop_s,
            unknown_s = r.unknown_s + excluded.unknown_s,
            planned_down_s = r.planned_down_s + excluded.planned_down_s,
            off_plan_s = r.off_plan_s + excluded.off_plan_s,
            produced = r.produced + excluded.produced,
            good = r.good + excluded.good,
            scrap = r.scrap + excluded.scrap,
            rework = r.rework + excluded.rework,
            off_plan_produced = r.off_plan_produced + excluded.off_plan_produced,
            ideal_produced_s = r.ideal_produced_s + excluded.ideal_produced_s,
            ideal_good_s = r.ideal_good_s + excluded.ideal_good_s,
            fault_stops = r.fault_stops + excluded.fault_stops,
            micro_stops = r.micro_stops + excluded.micro_stops
        RETURNING 1
    ), hour AS (
        INSERT INTO rollups.oee_1h AS r (site_id, equipment_id, bucket, planned_busy_s,
            production_s, setup_s, downtime_s, fault_s, idle_s, micro_stop_s, unknown_s,
            planned_down_s, off_plan_s, produced, good, scrap, rework, off_plan_produced,
            ideal_produced_s, ideal_good_s, fault_stops, micro_stops)
        SELECT site_id, equipment_id, date_trunc('hour', bucket_start), sum(planned_busy_s),
            sum(production_s), sum(setup_s), sum(downtime_s), sum(fault_s), sum(idle_s),
            sum(micro_stop_s), sum(unknown_s), sum(planned_down_s), sum(off_plan_s),
            sum(produced), sum(good), sum(scrap), sum(rework), sum(off_plan_produced),
            sum(ideal_produced_s), sum(ideal_good_s), sum(fault_stops), sum(micro_stops)
        FROM inserted GROUP BY 1, 2, 3
        ON CONFLICT (site_id, equipment_id, bucket) DO UPDATE SET
            planned_busy_s = r.planned_busy_s + excluded.planned_busy_s,
            production_s = r.production_s + excluded.production_s,
            setup_s = r.setup_s + excluded.setup_s,
            downtime_s = r.downtime_s + excluded.downtime_s,
            fault_s = r.fault_s + excluded.fault_s,
            idle_s = r.idle_s + excluded.idle_s,
            micro_stop_s = r.micro_stop_s + excluded.micro_stop_s,
            unknown_s = r.unknown_s + excluded.unknown_s,
            planned_down_s = r.planned_down_s + excluded.planned_down_s,
            off_plan_s = r.off_plan_s + excluded.off_plan_s,
            produced = r.produced + excluded.produced,
            good = r.good + excluded.good,
            scrap = r.scrap + excluded.scrap,
            rework = r.rework + excluded.rework,
            off_plan_produced = r.off_plan_produced + excluded.off_plan_produced,
            ideal_produced_s = r.ideal_produced_s + excluded.ideal_produced_s,
            ideal_good_s = r.ideal_good_s + excluded.ideal_good_s,
            fault_stops = r.fault_stops + excluded.fault_stops,
            micro_stops = r.micro_stops + excluded.micro_stops
        RETURNING 1
    )
    INSERT INTO rollups.data_versions AS v (site_id, equipment_id, day, version)
    SELECT site_id, equipment_id, (bucket_start AT TIME ZONE 'UTC')::date,
        nextval('rollups.data_version_seq')
    FROM b GROUP BY 1, 2, 3
    ON CONFLICT (site_id, equipment_id, day) DO UPDATE SET version = excluded.version;
END
$$;

CREATE FUNCTION ops.ingest_batch(
    p_site text, p_agent text, p_epoch text, p_seq bigint, p_digest text, p_count integer,
    p_created timestamptz, p_trace text, p_events jsonb, p_equipment text[],
    p_buckets boolean, p_status jsonb, p_version text, p_status_ts timestamptz,
    OUT result text, OUT opened bigint[]
) LANGUAGE plpgsql AS $$
BEGIN
    -- As ops.store_batch, its two calls made directly (an assignment, not a query).
    result := ops.claim_batch(p_site, p_agent, p_epoch, p_seq, p_digest, p_count, p_created,
        p_trace, p_events);
    IF result <> 'stored' THEN
        RETURN;
    END IF;
    opened := ops.finish_batch(p_site, p_agent, p_epoch, p_seq, p_created, p_equipment);
    IF p_buckets THEN
        PERFORM ops.store_buckets(p_events);
    END IF;
    IF p_status IS NOT NULL THEN
        UPDATE registry.agents SET status = p_status, version = COALESCE(p_version, version),
            status_reported_at = p_status_ts
        WHERE agent_id = p_agent
            AND (status_reported_at IS NULL OR status_reported_at < p_status_ts);
    END IF;
END
$$;
