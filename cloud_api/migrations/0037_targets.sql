-- 0037: targets for OEE and the other KPIs (oee/kpis.py, oee/targets.py).
--
-- One row per (site, scope, scope id, KPI, source). scope: 'site' (scope_id ''), 'line' or
-- 'equipment'. source 'config': from the agent's YAML, kept by ingest from the agent's config
-- event (agent_id says whose); source 'api': set through PUT /v1/targets (audited), which
-- overrides the YAML's target of the same scope and KPI. The read API takes, per KPI, the
-- most specific scope that has one: equipment > line > site.
CREATE TABLE registry.targets (
    site_id text NOT NULL REFERENCES registry.sites (site_id),
    scope text NOT NULL CHECK (scope IN ('site', 'line', 'equipment')),
    scope_id text NOT NULL,
    kpi text NOT NULL,
    source text NOT NULL CHECK (source IN ('config', 'api')),
    value double precision NOT NULL CHECK (value >= 0 AND value <> 'Infinity'),
    agent_id text,
    set_by text,
    set_at timestamptz NOT NULL DEFAULT now(),
    trace_id text,
    PRIMARY KEY (site_id, scope, scope_id, kpi, source),
    CHECK ((scope = 'site') = (scope_id = ''))
);

-- Answers carry targets, and cached answers are keyed by the data versions of their scope: a
-- change of a target bumps the versions of the equipment it applies to (the invalidation late
-- data uses), so no cache serves an answer with the old target. Security definer: the API
-- role writes targets but not data versions.
CREATE FUNCTION registry.targets_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    UPDATE rollups.data_versions v SET version = nextval('rollups.data_version_seq')
    WHERE v.site_id = r.site_id
      AND (r.scope = 'site'
           OR (r.scope = 'equipment' AND v.equipment_id = r.scope_id)
           OR (r.scope = 'line' AND v.equipment_id IN (
                   SELECT e.equipment_id FROM registry.equipment e
                   WHERE e.site_id = r.site_id AND e.line_id = r.scope_id)));
    RETURN NULL;
END;
$$;
CREATE TRIGGER targets_changed AFTER INSERT OR UPDATE OR DELETE ON registry.targets
    FOR EACH ROW EXECUTE FUNCTION registry.targets_changed();

GRANT INSERT, UPDATE, DELETE ON registry.targets TO gateway_api;
