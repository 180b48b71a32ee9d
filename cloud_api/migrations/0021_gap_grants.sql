-- 0021: ingest removes a declared loss when the batch arrives after all (it was in flight
-- when the agent shed it), so the ingest role, where roles are set up, may delete there.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'gateway_ingest') THEN
        GRANT DELETE ON ops.declared_losses TO gateway_ingest;
    END IF;
END $$;
