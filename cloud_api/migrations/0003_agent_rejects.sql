-- 0003: rejected batches by reason for one agent, readable by the API's database role.
-- ops.reject_counts has no site_id (a rejected message may name no trustworthy site), so it
-- carries no site policy and the API role gets no grant on it; this function returns the
-- counts of an agent only when the agent's enrolled site is visible under `app.sites`
-- (the same rule as the site policies), and is the API's only way to read them.
CREATE FUNCTION ops.agent_rejects(agent text) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT COALESCE(jsonb_object_agg(r.reason, r.count), '{}'::jsonb)
    FROM ops.reject_counts r
    WHERE r.agent_id = agent
      AND EXISTS (
        SELECT 1 FROM registry.agents a
        WHERE a.agent_id = agent
          AND (current_setting('app.sites', true) = '*'
               OR a.site_id = ANY (string_to_array(current_setting('app.sites', true), ',')))
      )
$$;
