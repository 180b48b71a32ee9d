-- 0032: credential changes reach every API and ingest process within a bound.
--
-- ops.credential_stamp holds one number that every change of what a credential is worth bumps
-- in the same transaction: a revoked token, a revoked (or retired) token signing key, an API
-- key created, changed or revoked, an agent key enrolled or revoked. Each process reads the
-- number at most every `security.revocation_refresh_seconds` and re-reads its revocation lists
-- only when it moved (cloud_api/revocations.py). A poll rather than LISTEN, so it also works
-- through PgBouncer in transaction mode; one row, so a read costs one index-free lookup.

CREATE TABLE ops.credential_stamp (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint NOT NULL DEFAULT 0,
    changed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO ops.credential_stamp DEFAULT VALUES;

-- Token signing keys that no process may accept any more, whatever key files a host still has.
CREATE TABLE ops.revoked_token_keys (
    kid text PRIMARY KEY,
    revoked_at timestamptz NOT NULL DEFAULT now(),
    reason text
);

-- SECURITY DEFINER: the role making the change (the CLI's login role, or ingest) needs no
-- write grant on the stamp.
CREATE FUNCTION ops.bump_credential_stamp() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE ops.credential_stamp SET version = version + 1, changed_at = now();
    RETURN NULL;
END;
$$;

CREATE TRIGGER revoked_tokens_stamp AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON ops.revoked_tokens FOR EACH STATEMENT EXECUTE FUNCTION ops.bump_credential_stamp();
CREATE TRIGGER revoked_token_keys_stamp AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON ops.revoked_token_keys FOR EACH STATEMENT EXECUTE FUNCTION ops.bump_credential_stamp();
CREATE TRIGGER agent_keys_stamp AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON registry.agent_keys FOR EACH STATEMENT EXECUTE FUNCTION ops.bump_credential_stamp();
CREATE TRIGGER api_keys_stamp AFTER INSERT OR DELETE OR TRUNCATE
    ON ops.api_keys FOR EACH STATEMENT EXECUTE FUNCTION ops.bump_credential_stamp();
-- Row-level with a condition: the API writes last_used_at on every key once a minute, which
-- must not make every process re-read its lists.
CREATE TRIGGER api_keys_changed_stamp AFTER UPDATE ON ops.api_keys FOR EACH ROW
    WHEN ((OLD.secret_hash, OLD.role, OLD.scopes, OLD.sites, OLD.expires_at, OLD.revoked_at)
          IS DISTINCT FROM
          (NEW.secret_hash, NEW.role, NEW.scopes, NEW.sites, NEW.expires_at, NEW.revoked_at))
    EXECUTE FUNCTION ops.bump_credential_stamp();

GRANT SELECT ON ops.credential_stamp, ops.revoked_token_keys TO gateway_api;
GRANT SELECT ON ops.credential_stamp TO gateway_ingest;
