-- 0030: count events carry what each counter increment changed in the buckets.
--
-- Agents before this change sent one field per increment: `produced` for a total counter,
-- `good`, `scrap` or `rework` for those counters. Summing `good` over count events
-- (/v1/quality) then gave 0 for a machine counting total parts and scrap. Agents now send
-- the signed effect of the increment on all four quantities (oee/quantities.py), so count
-- events summed over any window equal the buckets.
--
-- This rewrites the events stored in the old shape: exactly one non-zero quantity (the new
-- shape always has two). Agents of the old shape could count total+scrap or total+good,
-- each with optional rework; the model of an equipment is read from its old events: one
-- that ever sent a good increment has a good counter (its scrap is derived), any other
-- derives good. Idempotent: events in the new shape are left alone. The days touched get a
-- new data version, so API processes forget answers computed from the old shape.

WITH old AS (
    SELECT e.site_id, e.ts, e.event_id, e.equipment_id,
           COALESCE((e.body->>'produced')::bigint, 0) AS p,
           COALESCE((e.body->>'good')::bigint, 0) AS g,
           COALESCE((e.body->>'scrap')::bigint, 0) AS s,
           COALESCE((e.body->>'rework')::bigint, 0) AS r
    FROM facts.events e
    WHERE e.kind = 'count'
), single AS (
    SELECT * FROM old
    WHERE (p <> 0)::int + (g <> 0)::int + (s <> 0)::int + (r <> 0)::int = 1
), models AS (
    SELECT site_id, equipment_id, bool_or(g <> 0) AS by_good
    FROM single GROUP BY 1, 2
), changed AS (
    UPDATE facts.events e
    SET body = e.body || jsonb_build_object(
        'good', CASE
            WHEN o.p <> 0 AND NOT m.by_good THEN o.p
            WHEN o.s <> 0 THEN -o.s
            WHEN o.r <> 0 AND NOT m.by_good THEN -o.r
            ELSE o.g END,
        'scrap', CASE
            WHEN o.p <> 0 AND m.by_good THEN o.p
            WHEN o.g <> 0 THEN -o.g
            WHEN o.r <> 0 AND m.by_good THEN -o.r
            ELSE o.s END)
    FROM single o JOIN models m USING (site_id, equipment_id)
    WHERE e.site_id = o.site_id AND e.ts = o.ts AND e.event_id = o.event_id
    RETURNING e.site_id, e.equipment_id, e.ts
)
INSERT INTO rollups.data_versions AS v (site_id, equipment_id, day, version)
SELECT site_id, equipment_id, (ts AT TIME ZONE 'UTC')::date, nextval('rollups.data_version_seq')
FROM changed GROUP BY 1, 2, 3
ON CONFLICT (site_id, equipment_id, day) DO UPDATE SET version = excluded.version;
