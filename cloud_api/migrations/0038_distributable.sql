-- 0038: every key of a table holding site data starts with site_id, so each such table can be
-- distributed by site_id (Citus: a shard holds whole sites, and a unique key can only be
-- enforced within a shard when it contains the distribution column). README "Scale out";
-- tests/cloud_api/test_distributable_schema.py keeps it so.
--
-- An agent is enrolled at one site for good (`agents enroll` refuses another) and ingest
-- stores its batches only under that site (anything else is refused as wrong_site), so keys
-- that start with site_id identify the same rows as before. facts.batches: (agent_id, epoch,
-- seq) stays unique through the primary key (site_id, agent_id, epoch, seq).
DROP INDEX facts.batches_agent_key;

-- Ingest's per-agent sequence bookkeeping is written in the transaction that stores the
-- batch: keyed by site like the batch, it lives on the batch's shard.
ALTER TABLE ops.agent_epochs DROP CONSTRAINT agent_epochs_pkey,
    ADD PRIMARY KEY (site_id, agent_id, epoch);
ALTER TABLE ops.declared_losses DROP CONSTRAINT declared_losses_pkey,
    ADD PRIMARY KEY (site_id, agent_id, epoch, seq);
ALTER TABLE ops.seq_gaps DROP CONSTRAINT seq_gaps_pkey, ADD PRIMARY KEY (site_id, id);
DROP INDEX ops.seq_gaps_open;
CREATE INDEX seq_gaps_open ON ops.seq_gaps (site_id, agent_id, epoch, first_seq)
    WHERE resolved_at IS NULL;
