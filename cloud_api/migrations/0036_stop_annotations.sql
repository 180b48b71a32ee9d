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
