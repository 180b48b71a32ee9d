-- 0039: the site policy's reading of `app.sites` runs once per statement, not once per row.
--
-- `current_setting('app.sites', true) = '*' OR site_id = ANY (string_to_array(...))` was
-- evaluated for every row a statement read: one machine's year of hourly rollups (8,760 rows)
-- split the setting into an array 8,760 times, and the per-row filter was about a fifth of the
-- database's CPU for a 7-day answer (0.16 of 0.73 ms, README "Performance of the query API").
-- Wrapped in uncorrelated sub-selects, the same two expressions become InitPlans that
-- PostgreSQL evaluates once per statement and compares each row against the result. The
-- setting cannot change within a statement (set_config is local to the checkout's
-- transaction and no API statement sets it), so the rows visible are the same: '*' sees every
-- site, a list sees its sites, unset or empty sees none (ANY of NULL or of {} is not true).
--
-- Only USING (what reads see) changes; WITH CHECK (what writes may store) stays as it was.
-- Existing policies are altered; new tables and partitions get the new form from
-- ops.apply_access_policies, replaced below with only the USING text changed.

DO $$
DECLARE
    pol record;
BEGIN
    FOR pol IN
        SELECT schemaname, tablename FROM pg_policies
        WHERE policyname = 'site_scope'
          AND schemaname IN ('registry', 'facts', 'rollups', 'alerts')
          AND qual = '((current_setting(''app.sites''::text, true) = ''*''::text) OR '
                     '(site_id = ANY (string_to_array(current_setting(''app.sites''::text, '
                     'true), '',''::text))))'
    LOOP
        EXECUTE format(
            'ALTER POLICY site_scope ON %I.%I '
            'USING ((SELECT current_setting(''app.sites'', true) = ''*'') '
            '    OR site_id = ANY ((SELECT string_to_array(current_setting(''app.sites'', true), '',''))::text[]))',
            pol.schemaname, pol.tablename);
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION ops.apply_access_policies() RETURNS integer
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
                        'USING ((SELECT current_setting(''app.sites'', true) = ''*'') '
                        '    OR site_id = ANY ((SELECT string_to_array(current_setting(''app.sites'', true), '',''))::text[])) '
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
