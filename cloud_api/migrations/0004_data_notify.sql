-- 0004: tell API replicas when cached scope resolutions or data watermarks may be stale.
--
-- The API keeps the (members, watermark) of a scope and window in memory so a result-cache
-- hit needs no database round trip (cloud_api/marks.py). These triggers notify the channel
-- `gateway_data` whenever what that memo depends on changes. NOTIFY is transactional: the
-- message is delivered at commit (never for a rolled-back change) and after the change is
-- visible, so a listener that re-reads on receipt sees it. Identical payloads within one
-- transaction are folded into one message by PostgreSQL, so a large ingest batch costs one
-- notification per (site, equipment) it touched.

CREATE FUNCTION rollups.notify_data_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- JSON, so site or equipment ids containing separators stay unambiguous.
    PERFORM pg_notify('gateway_data', json_build_array(NEW.site_id, NEW.equipment_id)::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER data_versions_notify AFTER INSERT OR UPDATE ON rollups.data_versions
    FOR EACH ROW EXECUTE FUNCTION rollups.notify_data_version();

-- Deleting versions (retention, repair by hand) or changing the registry can change any
-- scope's members or watermark: an empty payload means "forget everything".
CREATE FUNCTION registry.notify_all() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gateway_data', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER data_versions_notify_all AFTER DELETE OR TRUNCATE ON rollups.data_versions
    FOR EACH STATEMENT EXECUTE FUNCTION registry.notify_all();
-- Row-level for the registry: ingest upserts the equipment of every batch with a WHERE that
-- usually changes nothing, and a statement trigger would fire (and flush every memo) anyway.
CREATE TRIGGER equipment_notify AFTER INSERT OR UPDATE OR DELETE ON registry.equipment
    FOR EACH ROW EXECUTE FUNCTION registry.notify_all();
CREATE TRIGGER equipment_notify_truncate AFTER TRUNCATE ON registry.equipment
    FOR EACH STATEMENT EXECUTE FUNCTION registry.notify_all();
CREATE TRIGGER sites_notify AFTER INSERT OR UPDATE OR DELETE ON registry.sites
    FOR EACH ROW EXECUTE FUNCTION registry.notify_all();
CREATE TRIGGER sites_notify_truncate AFTER TRUNCATE ON registry.sites
    FOR EACH STATEMENT EXECUTE FUNCTION registry.notify_all();
