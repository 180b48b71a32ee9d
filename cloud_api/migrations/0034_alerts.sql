-- 0034: alerts. Rules (from the cloud YAML or the admin API), the alerts they open and
-- resolve, and one delivery row per alert event and receiver (a transactional outbox: the
-- evaluation that opens or resolves an alert writes its deliveries in the same transaction).
--
-- Exactly-once guards, in the schema rather than in the workers:
-- - one open alert per (rule, subject): a partial unique index;
-- - one delivery per (alert, event, receiver): a unique constraint;
-- - one worker evaluates a rule at a time (its row locked FOR UPDATE SKIP LOCKED for the
--   evaluation) and one worker serves a receiver at a time (an advisory transaction lock on
--   the receiver's name), its deliveries in order.

CREATE SCHEMA IF NOT EXISTS alerts;

CREATE TABLE alerts.rules (
    rule_id text PRIMARY KEY,
    kind text NOT NULL,
    site_id text,
    spec jsonb NOT NULL,
    source text NOT NULL CHECK (source IN ('file', 'api')),
    enabled boolean NOT NULL DEFAULT true,
    deleted_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL,
    next_eval_at timestamptz NOT NULL DEFAULT now(),
    evaluated_at timestamptz,
    last_error text
);
CREATE INDEX rules_due ON alerts.rules (next_eval_at);

CREATE TABLE alerts.alerts (
    alert_id bigserial PRIMARY KEY,
    rule_id text NOT NULL REFERENCES alerts.rules (rule_id),
    kind text NOT NULL,
    subject text NOT NULL,
    site_id text NOT NULL,
    equipment_id text,
    agent_id text,
    since timestamptz,
    opened_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    summary text NOT NULL,
    resolution text,
    detail jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE UNIQUE INDEX alerts_open_once ON alerts.alerts (rule_id, subject) WHERE resolved_at IS NULL;
CREATE INDEX alerts_site_opened ON alerts.alerts (site_id, opened_at);
CREATE INDEX alerts_open ON alerts.alerts (opened_at) WHERE resolved_at IS NULL;

CREATE TABLE alerts.deliveries (
    delivery_id bigserial PRIMARY KEY,
    alert_id bigint NOT NULL REFERENCES alerts.alerts (alert_id),
    event text NOT NULL CHECK (event IN ('opened', 'resolved')),
    receiver text NOT NULL,
    site_id text NOT NULL,
    payload jsonb NOT NULL,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dead')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz,
    last_error text,
    UNIQUE (alert_id, event, receiver)
);
CREATE INDEX deliveries_pending ON alerts.deliveries (receiver, delivery_id)
    WHERE status = 'pending';
CREATE INDEX deliveries_dead ON alerts.deliveries (created_at) WHERE status = 'dead';

-- The API reads alerts, rules and dead letters of the caller's sites, and admins write rules.
-- A rule without a site (every site) is visible to callers who see every site only.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'gateway_api') THEN
        GRANT USAGE ON SCHEMA alerts TO gateway_api;
        GRANT SELECT ON alerts.alerts, alerts.deliveries TO gateway_api;
        GRANT SELECT, INSERT, UPDATE ON alerts.rules TO gateway_api;
    END IF;
END $$;

ALTER TABLE alerts.alerts ENABLE ROW LEVEL SECURITY;
ALTER TABLE alerts.deliveries ENABLE ROW LEVEL SECURITY;
ALTER TABLE alerts.rules ENABLE ROW LEVEL SECURITY;
CREATE POLICY site_scope ON alerts.alerts
    USING (current_setting('app.sites', true) = '*'
           OR site_id = ANY (string_to_array(current_setting('app.sites', true), ',')));
CREATE POLICY site_scope ON alerts.deliveries
    USING (current_setting('app.sites', true) = '*'
           OR site_id = ANY (string_to_array(current_setting('app.sites', true), ',')));
CREATE POLICY site_scope ON alerts.rules
    USING (current_setting('app.sites', true) = '*'
           OR site_id = ANY (string_to_array(current_setting('app.sites', true), ',')))
    WITH CHECK (current_setting('app.sites', true) = '*'
           OR site_id = ANY (string_to_array(current_setting('app.sites', true), ',')));

-- Workers evaluate rules on a timer (`alerts.evaluate_every`) and also as soon as facts they
-- read change: every stored batch (which may also move an agent's last contact and status)
-- and every verified refusal notify `gateway_alerts` with the site, and a listening worker
-- makes that site's rules (and those of every site) due at once. One message per batch
-- transaction (identical payloads fold), none for unverified refusals (anyone can send
-- those; they must not make workers busy).
CREATE FUNCTION alerts.notify_site() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gateway_alerts', COALESCE(NEW.site_id, ''));
    RETURN NULL;
END;
$$;
CREATE TRIGGER batches_alerts_notify AFTER INSERT ON facts.batches
    FOR EACH ROW EXECUTE FUNCTION alerts.notify_site();

-- SECURITY DEFINER: it reads the agent's site whatever role stores the refusal.
CREATE FUNCTION alerts.notify_refusal() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('gateway_alerts',
        COALESCE((SELECT site_id FROM registry.agents WHERE agent_id = NEW.agent_id), ''));
    RETURN NULL;
END;
$$;
CREATE TRIGGER reject_counts_alerts_notify AFTER INSERT OR UPDATE ON ops.reject_counts
    FOR EACH ROW WHEN (NEW.verified AND NEW.agent_id <> '')
    EXECUTE FUNCTION alerts.notify_refusal();
