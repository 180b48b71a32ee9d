-- 0033: OEE buckets count stops: `fault_stops` (failures: fault stops whose time is fault
-- downtime) and `micro_stops` (stops judged micro-stops), each stop in the bucket where it
-- starts (oee/engine.py). Both are additive components like the others: the facts carry
-- them, the rollups sum them in the statement that stores the facts (cloud_api/ingest.py
-- adds every component of oee.components.COMPONENT_FIELDS), and KPIs such as MTBF and MTTR
-- divide their sums at read time (oee/kpis.py).
--
-- Buckets stored before this change, and buckets of agents that do not count stops yet,
-- hold 0: they counted no stops, so a window reaching back before the upgrade has fewer
-- failures than it had, never more.

ALTER TABLE facts.oee_buckets
    ADD COLUMN fault_stops bigint NOT NULL DEFAULT 0,
    ADD COLUMN micro_stops bigint NOT NULL DEFAULT 0;
ALTER TABLE rollups.oee_1m
    ADD COLUMN fault_stops bigint NOT NULL DEFAULT 0,
    ADD COLUMN micro_stops bigint NOT NULL DEFAULT 0;
ALTER TABLE rollups.oee_1h
    ADD COLUMN fault_stops bigint NOT NULL DEFAULT 0,
    ADD COLUMN micro_stops bigint NOT NULL DEFAULT 0;
