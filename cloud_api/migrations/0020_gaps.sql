-- 0020: per-agent batch sequence tracking. Every stored batch advances its (agent, epoch);
-- a jump in seq opens a gap, a late batch fills it, a loss record (agent event `data_shed`)
-- declares it. Open gaps older than the agents' resend period mean lost batches.

CREATE TABLE ops.agent_epochs (
    agent_id text NOT NULL,
    epoch text NOT NULL,
    site_id text NOT NULL,
    max_seq bigint NOT NULL DEFAULT 0,
    batches bigint NOT NULL DEFAULT 0,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, epoch)
);

CREATE TABLE ops.seq_gaps (
    id bigserial PRIMARY KEY,
    site_id text NOT NULL,
    agent_id text NOT NULL,
    epoch text NOT NULL,
    first_seq bigint NOT NULL,
    last_seq bigint NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    resolution text CHECK (resolution IN ('filled', 'declared')),
    CHECK (first_seq <= last_seq)
);
CREATE INDEX seq_gaps_open ON ops.seq_gaps (agent_id, epoch, first_seq)
    WHERE resolved_at IS NULL;

-- Batches an agent deleted unsent under an explicit drop policy, as its loss record says.
CREATE TABLE ops.declared_losses (
    agent_id text NOT NULL,
    epoch text NOT NULL,
    seq bigint NOT NULL,
    site_id text NOT NULL,
    reason text NOT NULL,
    declared_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, epoch, seq)
);

CREATE VIEW ops.open_gaps AS
SELECT site_id, agent_id, epoch, first_seq, last_seq, last_seq - first_seq + 1 AS batches,
       detected_at, now() - detected_at AS age
FROM ops.seq_gaps
WHERE resolved_at IS NULL;
