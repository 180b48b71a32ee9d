-- 0031: refusals are charged to an agent only when the agent's signature verified the header
-- that names it. Anything refused before that (malformed, unknown agent or key, bad
-- signature, oversize) is counted under the topic it arrived on with agent_id '' and
-- verified = false: an unsigned frame naming agent-a can no longer raise agent-a's counts.
ALTER TABLE ops.reject_counts
    ADD COLUMN topic text NOT NULL DEFAULT '',
    ADD COLUMN verified boolean NOT NULL DEFAULT true;
-- Counts from before this migration were charged from headers whether verified or not;
-- those of reasons found before the signature check cannot be trusted: keep them, marked.
UPDATE ops.reject_counts SET verified = false
WHERE reason IN ('malformed', 'oversize', 'unsupported_version', 'unsupported_suite',
                 'unknown_agent', 'bad_signature', 'wrong_topic', 'wrong_site');
ALTER TABLE ops.reject_counts DROP CONSTRAINT reject_counts_pkey;
ALTER TABLE ops.reject_counts ADD PRIMARY KEY (reason, agent_id, topic, verified);

-- Whether an agent's enrolled site is visible under `app.sites` (the site policies' rule):
-- ops tables carry no site policy, so the fleet view reads them through functions using it.
CREATE FUNCTION ops.agent_visible(agent text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT EXISTS (
        SELECT 1 FROM registry.agents a
        WHERE a.agent_id = agent
          AND (current_setting('app.sites', true) = '*'
               OR a.site_id = ANY (string_to_array(current_setting('app.sites', true), ',')))
    )
$$;

-- The fleet view's counts of an agent: verified refusals only.
CREATE OR REPLACE FUNCTION ops.agent_rejects(agent text) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT COALESCE(jsonb_object_agg(r.reason, r.count), '{}'::jsonb)
    FROM (SELECT reason, sum(count) AS count FROM ops.reject_counts
          WHERE agent_id = agent AND verified GROUP BY reason) r
    WHERE ops.agent_visible(agent)
$$;

-- Batches an agent declared lost (shed under its drop policy, or refused for good by ingest
-- and dropped), by reason.
CREATE FUNCTION ops.agent_losses(agent text) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT COALESCE(jsonb_object_agg(d.reason, d.count), '{}'::jsonb)
    FROM (SELECT reason, count(*) AS count FROM ops.declared_losses
          WHERE agent_id = agent GROUP BY reason) d
    WHERE ops.agent_visible(agent)
$$;
