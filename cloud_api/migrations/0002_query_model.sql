-- 0002: what the query API reads besides facts and rollups: data versions for the result
-- cache, the configuration and shift calendars agents report, indexes for state timelines
-- and agent status, and partition retention.

-- One row per (site, equipment, UTC day) with rollup data; `version` comes from one global
-- sequence and is bumped in the ingest transaction that changes the day, so the largest
-- version over a query's scope and window changes exactly when its result can change.
CREATE SEQUENCE rollups.data_version_seq;
CREATE TABLE rollups.data_versions (
    site_id text NOT NULL,
    equipment_id text NOT NULL,
    day date NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (site_id, equipment_id, day)
);

-- Shift calendars as reported by agents (`agent` events with code "config").
CREATE TABLE registry.shift_calendars (
    site_id text NOT NULL REFERENCES registry.sites (site_id),
    agent_id text NOT NULL,
    timezone text,
    shifts jsonb NOT NULL DEFAULT '[]'::jsonb,
    reported_at timestamptz NOT NULL,
    PRIMARY KEY (site_id, agent_id)
);

-- Downtime and scrap reason codes as reported by agents (from their signal maps).
CREATE TABLE registry.reason_codes (
    site_id text NOT NULL REFERENCES registry.sites (site_id),
    equipment_id text NOT NULL,
    code text NOT NULL,
    reason text NOT NULL,
    PRIMARY KEY (site_id, equipment_id, code)
);

ALTER TABLE registry.agents ADD COLUMN status_reported_at timestamptz;

-- State timelines and agent status read the latest events of one kind per equipment/agent.
CREATE INDEX events_agent_kind ON facts.events (site_id, agent_id, kind, ts);

-- Retention: drop whole monthly partitions that end before `keep_from`.
CREATE FUNCTION ops.drop_partitions_before(keep_from timestamptz) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    part record;
    upper_bound timestamptz;
BEGIN
    FOR part IN
        SELECT c.oid::regclass::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent IN ('facts.events'::regclass, 'facts.oee_buckets'::regclass)
    LOOP
        upper_bound := substring(part.bound FROM 'TO \(''([^'']+)''\)')::timestamptz;
        IF upper_bound IS NOT NULL AND upper_bound <= keep_from THEN
            EXECUTE format('DROP TABLE %s', part.name);
            RETURN NEXT part.name;
        END IF;
    END LOOP;
END $$;
