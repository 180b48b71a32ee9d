-- 0036: annotations reclassify stops.
--
-- A downtime annotation names a stop by its equipment and start (the `ts` of the state event
-- that began it); the newest live annotation of a stop gives its effective reason in every
-- view (cloud_api/api/queries.py, `annotated`). Deleting an annotation marks it deleted (who,
-- when, under which trace id) instead of removing the row, so the stop's history stays
-- readable next to the audit trail. The API bumps the data version of the days the stop
-- touches in the same transaction, so cached views of those days are forgotten at once
-- (the notification of 0022_data_notify_day.sql).

ALTER TABLE facts.annotations
    ADD COLUMN deleted_at timestamptz,
    ADD COLUMN deleted_by text,
    ADD COLUMN deleted_trace_id text;

CREATE INDEX annotations_live_stop ON facts.annotations (site_id, equipment_id, ts, created_at)
    WHERE kind = 'downtime' AND deleted_at IS NULL;

GRANT UPDATE (deleted_at, deleted_by, deleted_trace_id) ON facts.annotations TO gateway_api;
GRANT INSERT, UPDATE ON rollups.data_versions TO gateway_api;
GRANT USAGE ON SEQUENCE rollups.data_version_seq TO gateway_api;

-- The Pareto correction of annotated stops, one definition for the API and the Grafana panel:
-- per annotated stop (its newest live downtime annotation) with time in the OEE buckets of a
-- shift starting in [p_start, p_end), the seconds to move from the PLC's reason to the
-- annotated one: the stop's time in each such bucket, at most what that bucket holds for the
-- PLC's reason (a micro-stop counted as production has no downtime to move). Equipment is
-- chosen by site and equipment id lists (pairs of both); the caller's site policy applies
-- (SECURITY INVOKER).
CREATE FUNCTION facts.stop_reason_moves(
    p_sites text[], p_equipment text[], p_start timestamptz, p_end timestamptz
) RETURNS TABLE (site_id text, equipment_id text, stop_start timestamptz, plc_reason text,
                 reason text, seconds double precision)
LANGUAGE sql STABLE SECURITY INVOKER AS $$
    SELECT a.site_id, a.equipment_id, a.ts, e.plc_reason, a.reason, m.seconds
    FROM (
        SELECT DISTINCT ON (a.site_id, a.equipment_id, a.ts) a.site_id, a.equipment_id, a.ts,
               a.reason
        FROM facts.annotations a
        WHERE a.site_id = ANY (p_sites) AND a.equipment_id = ANY (p_equipment)
          AND a.kind = 'downtime' AND a.deleted_at IS NULL AND a.ts < p_end
        ORDER BY a.site_id, a.equipment_id, a.ts, a.created_at DESC, a.annotation_id DESC
    ) a
    CROSS JOIN LATERAL (
        SELECT COALESCE(e.body->>'reason', 'unspecified') AS plc_reason FROM facts.events e
        WHERE e.site_id = a.site_id AND e.equipment_id = a.equipment_id AND e.kind = 'state'
          AND e.ts = a.ts AND e.body->>'state' IN ('fault', 'idle')
        ORDER BY e.event_id DESC LIMIT 1
    ) e
    CROSS JOIN LATERAL (
        SELECT COALESCE((
            SELECT n.ts FROM facts.events n
            WHERE n.site_id = a.site_id AND n.equipment_id = a.equipment_id
              AND n.kind = 'state' AND n.ts > a.ts
            ORDER BY n.ts LIMIT 1), 'infinity'::timestamptz) AS until
    ) n
    CROSS JOIN LATERAL (
        SELECT COALESCE(sum(least(
            extract(epoch FROM least(n.until, b.bucket_end) - greatest(a.ts, b.bucket_start))::float8,
            COALESCE((b.downtime_by_reason->>e.plc_reason)::float8, 0))), 0) AS seconds
        FROM facts.oee_buckets b
        WHERE b.site_id = a.site_id AND b.equipment_id = a.equipment_id
          AND b.shift IS NOT NULL AND b.bucket_start >= p_start AND b.bucket_start < p_end
          AND b.bucket_start < n.until AND b.bucket_end > a.ts
    ) m
    WHERE m.seconds > 0 AND a.reason <> e.plc_reason
$$;
GRANT EXECUTE ON FUNCTION facts.stop_reason_moves(text[], text[], timestamptz, timestamptz)
    TO gateway_api;
