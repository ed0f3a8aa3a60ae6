-- The change log: one row per committed change that bumped a revision, at a global position.
--
-- Positions are handed out from billing_change_log.last_position, whose row lock each writer takes as
-- the last step of its transaction and holds until it commits: positions are dense and in commit order,
-- so a reader that has seen position N has seen every position below it (see src/store/postgres.rs).
CREATE TABLE billing_changes (
    position     BIGINT PRIMARY KEY CHECK (position >= 1),
    workspace_id UUID NOT NULL,
    revision     BIGINT NOT NULL CHECK (revision >= 1),
    committed_at TIMESTAMPTZ NOT NULL,
    -- The record after the change is the audit row's `after`.
    FOREIGN KEY (workspace_id, revision) REFERENCES billing_audit (workspace_id, revision),
    UNIQUE (workspace_id, revision)
);

-- The log's one state row: which store this is (cursors name it), the last position handed out, and
-- the position through which old changes were pruned (older cursors have expired).
CREATE TABLE billing_change_log (
    singleton      BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    store_id       TEXT NOT NULL CHECK (store_id ~ '^[0-9a-f]{32}$'),
    last_position  BIGINT NOT NULL CHECK (last_position >= 0),
    pruned_through BIGINT NOT NULL CHECK (pruned_through >= 0 AND pruned_through <= last_position)
);
INSERT INTO billing_change_log (store_id, last_position, pruned_through)
VALUES (md5(random()::text || clock_timestamp()::text), 0, 0);
