-- The change log: one row per committed change that bumped a revision, at a global position.
--
-- Positions are handed out from billing_change_log.last_position inside the writer's BEGIN IMMEDIATE
-- transaction, which holds the database write lock until it commits: positions are dense and in
-- commit order (see src/store/sqlite.rs).
CREATE TABLE billing_changes (
    position     INTEGER PRIMARY KEY CHECK (position >= 1),
    workspace_id TEXT NOT NULL,
    revision     INTEGER NOT NULL CHECK (revision >= 1),
    committed_at TEXT NOT NULL,
    -- The record after the change is the audit row's `after`.
    FOREIGN KEY (workspace_id, revision) REFERENCES billing_audit (workspace_id, revision),
    UNIQUE (workspace_id, revision)
) STRICT;

-- The log's one state row: which store this is (cursors name it), the last position handed out, and
-- the position through which old changes were pruned (older cursors have expired).
CREATE TABLE billing_change_log (
    singleton      INTEGER PRIMARY KEY CHECK (singleton = 1),
    store_id       TEXT NOT NULL CHECK (length(store_id) = 32 AND store_id = lower(store_id)),
    last_position  INTEGER NOT NULL CHECK (last_position >= 0),
    pruned_through INTEGER NOT NULL CHECK (pruned_through >= 0 AND pruned_through <= last_position)
) STRICT;
INSERT INTO billing_change_log (singleton, store_id, last_position, pruned_through)
VALUES (1, lower(hex(randomblob(16))), 0, 0);
