-- 0022: data change notifications name the day that changed.
--
-- The API's memo of scope watermarks (cloud_api/marks.py) used to forget every entry of an
-- equipment whenever any of its days changed, so under live ingest no entry of a busy
-- machine lived longer than a batch, and every result-cache hit needed a database round trip
-- again. With the day in the payload, only entries whose window touches that day are
-- forgotten. PostgreSQL still folds identical payloads within one transaction, so a batch
-- costs one notification per (site, equipment, day) it touched. An API process that does not
-- know the three-element payload treats it as "forget everything" (fails safe).

CREATE OR REPLACE FUNCTION rollups.notify_data_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'gateway_data', json_build_array(NEW.site_id, NEW.equipment_id, NEW.day)::text
    );
    RETURN NULL;
END;
$$;
