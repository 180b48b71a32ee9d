-- 0010: security and governance. Database roles for the HTTP API (read, site-scoped by
-- row-level security) and for ingest (writes every site), site policies on every table with
-- a site_id column, service API keys, revoked token ids, immutable audit records, operator
-- annotations with encrypted identities, per-route request statistics, and the batch trace id
-- on stored events.
--
-- Convention for later migrations: `cloud-api migrate` calls ops.apply_access_policies() after
-- the last migration, so a table added to registry/facts/rollups gets its grants and, when it
-- has a site_id column, its site policy without further work. A migration may also call it.

-- Roles are cluster-wide while migrations run per database: create them once, tolerate a
-- concurrent creator. NOLOGIN: deployments log in as a member role (or the migrating role) and
-- the API switches to gateway_api per connection checkout.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'gateway_api') THEN
        BEGIN
            CREATE ROLE gateway_api NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'gateway_ingest') THEN
        BEGIN
            -- Ingest stores batches of every site, so site policies do not apply to it.
            CREATE ROLE gateway_ingest NOLOGIN NOSUPERUSER BYPASSRLS NOCREATEDB NOCREATEROLE;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END $$;

GRANT USAGE ON SCHEMA registry, facts, rollups, audit, monitoring, ops TO gateway_api;
GRANT USAGE ON SCHEMA registry, facts, rollups, audit, monitoring, ops TO gateway_ingest;

-- Partitions are created by ingest through this function; it runs as its owner so the ingest
-- role needs no ownership of the partitioned tables.
ALTER FUNCTION ops.ensure_month_partitions(timestamptz)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- The batch trace id, copied onto every stored event so one id finds a batch everywhere.
ALTER TABLE facts.events ADD COLUMN trace_id text;
CREATE INDEX events_trace ON facts.events (trace_id) WHERE trace_id IS NOT NULL;

-- Operator annotations of downtime and quality events. The operator identity is personal
-- data: stored only as AES-256-GCM ciphertext (nonce || ciphertext || tag) with its key id.
CREATE TABLE facts.annotations (
    site_id text NOT NULL,
    annotation_id uuid NOT NULL,
    equipment_id text NOT NULL,
    ts timestamptz NOT NULL,
    kind text NOT NULL CHECK (kind IN ('downtime', 'quality')),
    reason text NOT NULL,
    note text,
    event_id uuid,
    operator_key_id text,
    operator_sealed bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL,
    trace_id text,
    PRIMARY KEY (site_id, annotation_id),
    CHECK ((operator_key_id IS NULL) = (operator_sealed IS NULL))
);
CREATE INDEX annotations_equipment ON facts.annotations (site_id, equipment_id, ts);

-- Service API keys: the prefix is public (it names the key), the secret is stored as a hash.
CREATE TABLE ops.api_keys (
    prefix text PRIMARY KEY,
    secret_hash text NOT NULL,
    name text NOT NULL,
    role text NOT NULL CHECK (role IN ('viewer', 'engineer', 'admin', 'service')),
    scopes text[] NOT NULL,
    sites text[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL,
    expires_at timestamptz,
    revoked_at timestamptz,
    last_used_at timestamptz
);

-- Bearer tokens revoked before their expiry, by token id (jti).
CREATE TABLE ops.revoked_tokens (
    jti text PRIMARY KEY,
    revoked_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    reason text
);

-- Every write leaves one row; rows are never changed or removed by the API or ingest roles.
CREATE TABLE audit.records (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    actor_kind text NOT NULL,
    action text NOT NULL,
    target text,
    site_id text,
    detail jsonb NOT NULL DEFAULT '{}'::jsonb,
    trace_id text
);
CREATE INDEX records_at ON audit.records (at);
CREATE INDEX records_trace ON audit.records (trace_id) WHERE trace_id IS NOT NULL;

CREATE FUNCTION audit.refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit records are append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER records_append_only BEFORE UPDATE OR DELETE ON audit.records
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER records_no_truncate BEFORE TRUNCATE ON audit.records
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();

-- Request statistics per route and minute. `histogram` counts durations in log-spaced buckets
-- (cloud_api.ops_stats defines the bounds); counts and histograms are additive, so replicas
-- add into the same row and any window's percentiles come from summed histograms.
CREATE TABLE monitoring.request_stats (
    minute timestamptz NOT NULL,
    route text NOT NULL,
    method text NOT NULL,
    requests bigint NOT NULL DEFAULT 0,
    server_errors bigint NOT NULL DEFAULT 0,
    client_errors bigint NOT NULL DEFAULT 0,
    cacheable bigint NOT NULL DEFAULT 0,
    cache_hits bigint NOT NULL DEFAULT 0,
    total_ms double precision NOT NULL DEFAULT 0,
    histogram bigint[] NOT NULL,
    PRIMARY KEY (minute, route, method)
);

GRANT SELECT, INSERT ON audit.records TO gateway_api, gateway_ingest;
GRANT USAGE ON SEQUENCE audit.records_id_seq TO gateway_api, gateway_ingest;
GRANT SELECT, INSERT, UPDATE ON monitoring.request_stats TO gateway_api;
GRANT SELECT ON ops.api_keys, ops.revoked_tokens TO gateway_api;
GRANT UPDATE (last_used_at) ON ops.api_keys TO gateway_api;
GRANT INSERT ON facts.annotations TO gateway_api;

-- Grants for both roles and the site policy on every table of registry/facts/rollups that has a
-- site_id column. Idempotent; `cloud-api migrate` runs it after every migration run.
-- Views get security_invoker so the caller's policies apply; materialized views cannot carry
-- policies, so the API role is not granted them (a warning says so).
CREATE FUNCTION ops.apply_access_policies() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    rel record;
    created integer := 0;
BEGIN
    FOR rel IN
        SELECT c.oid::regclass AS name, n.nspname AS schema, c.relname AS relname,
               c.relkind AS kind, c.relispartition AS is_partition,
               EXISTS (SELECT 1 FROM pg_attribute a
                       WHERE a.attrelid = c.oid AND a.attname = 'site_id'
                         AND a.attnum > 0 AND NOT a.attisdropped) AS has_site
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname IN ('registry', 'facts', 'rollups') AND c.relkind IN ('r', 'p', 'v', 'm')
    LOOP
        IF rel.kind IN ('r', 'p') THEN
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO gateway_ingest', rel.name);
            IF rel.has_site THEN
                EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', rel.name);
                IF NOT EXISTS (SELECT 1 FROM pg_policies
                               WHERE schemaname = rel.schema AND tablename = rel.relname
                                 AND policyname = 'site_scope') THEN
                    -- app.sites: comma-separated visible site ids, or '*' for every site;
                    -- unset or empty shows nothing.
                    EXECUTE format(
                        'CREATE POLICY site_scope ON %s '
                        'USING (current_setting(''app.sites'', true) = ''*'' '
                        '    OR site_id = ANY (string_to_array(current_setting(''app.sites'', true), '',''))) '
                        'WITH CHECK (current_setting(''app.sites'', true) = ''*'' '
                        '    OR site_id = ANY (string_to_array(current_setting(''app.sites'', true), '','')))',
                        rel.name);
                    created := created + 1;
                END IF;
            END IF;
            -- Partitions are read through their parent; granting them would skip the parent's
            -- policy when queried directly.
            IF NOT rel.is_partition THEN
                EXECUTE format('GRANT SELECT ON %s TO gateway_api', rel.name);
            END IF;
        ELSIF rel.kind = 'v' THEN
            EXECUTE format('ALTER VIEW %s SET (security_invoker = true)', rel.name);
            EXECUTE format('GRANT SELECT ON %s TO gateway_api', rel.name);
        ELSIF rel.has_site THEN
            RAISE WARNING 'materialized view % has site_id but cannot carry a site policy; '
                          'gateway_api is not granted it', rel.name;
        ELSE
            EXECUTE format('GRANT SELECT ON %s TO gateway_api', rel.name);
        END IF;
    END LOOP;
    EXECUTE 'GRANT USAGE ON ALL SEQUENCES IN SCHEMA registry, facts, rollups, ops, audit TO gateway_ingest';
    EXECUTE 'GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA ops TO gateway_ingest';
    EXECUTE 'REVOKE ALL ON ops.api_keys, ops.revoked_tokens, ops.schema_migrations FROM gateway_ingest';
    RETURN created;
END $$;

SELECT ops.apply_access_policies();
