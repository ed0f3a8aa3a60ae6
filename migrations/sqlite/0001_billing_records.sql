-- One record per workspace: the inputs every billing-mode decision is made from.
CREATE TABLE billing_records (
    workspace_id    TEXT PRIMARY KEY NOT NULL
        CHECK (length(workspace_id) = 36 AND workspace_id = lower(workspace_id)),
    runtime         TEXT NULL,
    model           TEXT NULL,
    -- Names (never values) of the LLM credentials the workspace owns: a JSON array of strings.
    credential_keys TEXT NOT NULL DEFAULT '[]'
        CHECK (json_valid(credential_keys) AND json_type(credential_keys) = 'array'),
    override_mode   TEXT NULL
        CONSTRAINT billing_records_override_mode_check
        CHECK (override_mode IN ('platform_managed', 'byok', 'disabled')),
    revision        INTEGER NOT NULL CHECK (revision >= 1),
    updated_at      TEXT NOT NULL
) STRICT;

-- One row per change, written in the same transaction as the change.
CREATE TABLE billing_audit (
    workspace_id TEXT NOT NULL REFERENCES billing_records (workspace_id),
    revision     INTEGER NOT NULL CHECK (revision >= 1),
    actor        TEXT NOT NULL,
    reason       TEXT NOT NULL,
    before       TEXT NULL CHECK (before IS NULL OR json_valid(before)),
    after        TEXT NOT NULL CHECK (json_valid(after)),
    at           TEXT NOT NULL,
    PRIMARY KEY (workspace_id, revision)
) STRICT;
