-- 0035: remote configuration of agents, kept as versions (cloud_api/fleetconfig/).
--
-- registry.agent_configs: every version pushed for an agent (the YAML as written, with its
-- ${ENV} references, never their values), who pushed it, when, why and under which trace id.
-- Versions are immutable: nothing updates or deletes them (a rollback makes an earlier one
-- current again). registry.agent_config_current: the version the cloud wants the agent to run
-- (the desired version) and the publication serial the signed message carries; every push and
-- every rollback takes the next serial, so an agent can refuse any older message.

CREATE TABLE registry.agent_configs (
    site_id text NOT NULL,
    agent_id text NOT NULL REFERENCES registry.agents (agent_id),
    version integer NOT NULL CHECK (version >= 1),
    yaml text NOT NULL,
    digest text NOT NULL CHECK (digest ~ '^[0-9a-f]{64}$'),
    author text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    comment text NOT NULL DEFAULT '',
    trace_id text,
    PRIMARY KEY (agent_id, version)
);
CREATE INDEX agent_configs_site ON registry.agent_configs (site_id, agent_id);

CREATE FUNCTION registry.agent_configs_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'configuration versions are immutable';
END;
$$;
CREATE TRIGGER agent_configs_immutable BEFORE UPDATE OR DELETE ON registry.agent_configs
    FOR EACH ROW EXECUTE FUNCTION registry.agent_configs_immutable();

CREATE TABLE registry.agent_config_current (
    site_id text NOT NULL,
    agent_id text PRIMARY KEY REFERENCES registry.agents (agent_id),
    version integer NOT NULL,
    serial integer NOT NULL CHECK (serial >= 1),
    rollback boolean NOT NULL DEFAULT false,
    changed_at timestamptz NOT NULL DEFAULT now(),
    changed_by text NOT NULL,
    published_at timestamptz,
    FOREIGN KEY (agent_id, version) REFERENCES registry.agent_configs (agent_id, version)
);

-- The API writes versions as the caller (site policies apply, see 0010); ingest never does.
GRANT INSERT ON registry.agent_configs TO gateway_api;
GRANT INSERT, UPDATE ON registry.agent_config_current TO gateway_api;

-- What each agent last reported about its configuration (agent events with code
-- config_result, kept by ingest in the transaction that stores them): the version it runs
-- and the outcome of the last publication it handled.
CREATE TABLE registry.agent_config_reported (
    site_id text NOT NULL,
    agent_id text PRIMARY KEY REFERENCES registry.agents (agent_id),
    running_version integer,
    last_result jsonb NOT NULL,
    reported_at timestamptz NOT NULL
);
