-- 0001: schemas, registry, facts (partitioned by time), rollups, quarantine.
-- Every fact and rollup key starts with site_id (ready for distribution by site).

CREATE SCHEMA IF NOT EXISTS registry;
CREATE SCHEMA IF NOT EXISTS facts;
CREATE SCHEMA IF NOT EXISTS rollups;
CREATE SCHEMA IF NOT EXISTS audit;
CREATE SCHEMA IF NOT EXISTS monitoring;
CREATE SCHEMA IF NOT EXISTS ops;

CREATE TABLE registry.sites (
    site_id text PRIMARY KEY,
    name text,
    timezone text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE registry.agents (
    agent_id text PRIMARY KEY,
    site_id text NOT NULL REFERENCES registry.sites (site_id),
    enrolled_at timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz,
    last_batch_created timestamptz,
    version text,
    status jsonb NOT NULL DEFAULT '{}'::jsonb
);

CREATE TABLE registry.agent_keys (
    agent_id text NOT NULL REFERENCES registry.agents (agent_id),
    key_id text NOT NULL,
    public_key text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    PRIMARY KEY (agent_id, key_id)
);

CREATE TABLE registry.lines (
    site_id text NOT NULL REFERENCES registry.sites (site_id),
    line_id text NOT NULL,
    PRIMARY KEY (site_id, line_id)
);

CREATE TABLE registry.equipment (
    site_id text NOT NULL REFERENCES registry.sites (site_id),
    equipment_id text NOT NULL,
    line_id text,
    agent_id text,
    config jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, equipment_id)
);

-- One row per stored batch: the exactly-once key is (agent_id, epoch, seq).
CREATE TABLE facts.batches (
    site_id text NOT NULL,
    agent_id text NOT NULL,
    epoch text NOT NULL,
    seq bigint NOT NULL,
    digest text NOT NULL,
    event_count integer NOT NULL,
    created timestamptz,
    received_at timestamptz NOT NULL DEFAULT now(),
    trace_id text,
    PRIMARY KEY (site_id, agent_id, epoch, seq)
);
CREATE UNIQUE INDEX batches_agent_key ON facts.batches (agent_id, epoch, seq);

CREATE TABLE facts.events (
    site_id text NOT NULL,
    ts timestamptz NOT NULL,
    event_id uuid NOT NULL,
    agent_id text NOT NULL,
    epoch text NOT NULL,
    seq bigint NOT NULL,
    equipment_id text,
    kind text NOT NULL,
    body jsonb NOT NULL,
    PRIMARY KEY (site_id, ts, event_id)
) PARTITION BY RANGE (ts);
CREATE INDEX events_ts_brin ON facts.events USING brin (ts);
CREATE INDEX events_equipment ON facts.events (site_id, equipment_id, kind, ts);

CREATE TABLE facts.oee_buckets (
    site_id text NOT NULL,
    equipment_id text NOT NULL,
    bucket_start timestamptz NOT NULL,
    bucket_end timestamptz NOT NULL,
    event_id uuid NOT NULL,
    shift text,
    shift_start timestamptz,
    planned_busy_s double precision NOT NULL DEFAULT 0,
    production_s double precision NOT NULL DEFAULT 0,
    setup_s double precision NOT NULL DEFAULT 0,
    downtime_s double precision NOT NULL DEFAULT 0,
    fault_s double precision NOT NULL DEFAULT 0,
    idle_s double precision NOT NULL DEFAULT 0,
    micro_stop_s double precision NOT NULL DEFAULT 0,
    unknown_s double precision NOT NULL DEFAULT 0,
    planned_down_s double precision NOT NULL DEFAULT 0,
    off_plan_s double precision NOT NULL DEFAULT 0,
    ideal_produced_s double precision NOT NULL DEFAULT 0,
    ideal_good_s double precision NOT NULL DEFAULT 0,
    produced bigint NOT NULL DEFAULT 0,
    good bigint NOT NULL DEFAULT 0,
    scrap bigint NOT NULL DEFAULT 0,
    rework bigint NOT NULL DEFAULT 0,
    off_plan_produced bigint NOT NULL DEFAULT 0,
    downtime_by_reason jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (site_id, equipment_id, bucket_start, event_id)
) PARTITION BY RANGE (bucket_start);
CREATE INDEX oee_buckets_brin ON facts.oee_buckets USING brin (bucket_start);

CREATE TABLE rollups.oee_1m (
    site_id text NOT NULL,
    equipment_id text NOT NULL,
    bucket timestamptz NOT NULL,
    planned_busy_s double precision NOT NULL DEFAULT 0,
    production_s double precision NOT NULL DEFAULT 0,
    setup_s double precision NOT NULL DEFAULT 0,
    downtime_s double precision NOT NULL DEFAULT 0,
    fault_s double precision NOT NULL DEFAULT 0,
    idle_s double precision NOT NULL DEFAULT 0,
    micro_stop_s double precision NOT NULL DEFAULT 0,
    unknown_s double precision NOT NULL DEFAULT 0,
    planned_down_s double precision NOT NULL DEFAULT 0,
    off_plan_s double precision NOT NULL DEFAULT 0,
    ideal_produced_s double precision NOT NULL DEFAULT 0,
    ideal_good_s double precision NOT NULL DEFAULT 0,
    produced bigint NOT NULL DEFAULT 0,
    good bigint NOT NULL DEFAULT 0,
    scrap bigint NOT NULL DEFAULT 0,
    rework bigint NOT NULL DEFAULT 0,
    off_plan_produced bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (site_id, equipment_id, bucket)
);

CREATE TABLE rollups.oee_1h (
    site_id text NOT NULL,
    equipment_id text NOT NULL,
    bucket timestamptz NOT NULL,
    planned_busy_s double precision NOT NULL DEFAULT 0,
    production_s double precision NOT NULL DEFAULT 0,
    setup_s double precision NOT NULL DEFAULT 0,
    downtime_s double precision NOT NULL DEFAULT 0,
    fault_s double precision NOT NULL DEFAULT 0,
    idle_s double precision NOT NULL DEFAULT 0,
    micro_stop_s double precision NOT NULL DEFAULT 0,
    unknown_s double precision NOT NULL DEFAULT 0,
    planned_down_s double precision NOT NULL DEFAULT 0,
    off_plan_s double precision NOT NULL DEFAULT 0,
    ideal_produced_s double precision NOT NULL DEFAULT 0,
    ideal_good_s double precision NOT NULL DEFAULT 0,
    produced bigint NOT NULL DEFAULT 0,
    good bigint NOT NULL DEFAULT 0,
    scrap bigint NOT NULL DEFAULT 0,
    rework bigint NOT NULL DEFAULT 0,
    off_plan_produced bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (site_id, equipment_id, bucket)
);

-- Everything ingest refused, with the reason; payloads kept for investigation.
CREATE TABLE ops.quarantine (
    id bigserial PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    reason text NOT NULL,
    detail text,
    topic text,
    site_id text,
    agent_id text,
    epoch text,
    seq bigint,
    payload bytea
);
CREATE INDEX quarantine_reason ON ops.quarantine (reason, received_at);

CREATE TABLE ops.reject_counts (
    reason text NOT NULL,
    agent_id text NOT NULL DEFAULT '',
    count bigint NOT NULL DEFAULT 0,
    last_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reason, agent_id)
);

-- Monthly partitions, created ahead by ingest and by `cloud-api migrate`.
CREATE FUNCTION ops.ensure_month_partitions(t timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    m timestamptz := date_trunc('month', t AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    suffix text := to_char(m AT TIME ZONE 'UTC', 'YYYYMM');
    nxt timestamptz := (date_trunc('month', t AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC';
    parent text;
BEGIN
    FOREACH parent IN ARRAY ARRAY['events', 'oee_buckets'] LOOP
        IF to_regclass(format('facts.%I', parent || '_' || suffix)) IS NULL THEN
            BEGIN
                EXECUTE format(
                    'CREATE TABLE facts.%I PARTITION OF facts.%I FOR VALUES FROM (%L) TO (%L)',
                    parent || '_' || suffix, parent, m, nxt);
            EXCEPTION WHEN duplicate_table THEN
                NULL;  -- another worker created it first
            END;
        END IF;
    END LOOP;
END $$;
