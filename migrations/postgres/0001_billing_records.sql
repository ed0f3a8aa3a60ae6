-- One record per workspace: the inputs every billing-mode decision is made from.
CREATE TABLE billing_records (
    workspace_id    UUID PRIMARY KEY,
    runtime         TEXT NULL,
    model           TEXT NULL,
    -- Names (never values) of the LLM credentials the workspace owns: a JSON array of strings.
    credential_keys JSONB NOT NULL DEFAULT '[]'::jsonb
        CONSTRAINT billing_records_credential_keys_array CHECK (jsonb_typeof(credential_keys) = 'array'),
    override_mode   TEXT NULL
        CONSTRAINT billing_records_override_mode_check
        CHECK (override_mode IN ('platform_managed', 'byok', 'disabled')),
    revision        BIGINT NOT NULL CONSTRAINT billing_records_revision_positive CHECK (revision >= 1),
    updated_at      TIMESTAMPTZ NOT NULL
);

-- One row per change, written in the same transaction as the change.
CREATE TABLE billing_audit (
    workspace_id UUID NOT NULL REFERENCES billing_records (workspace_id),
    revision     BIGINT NOT NULL CHECK (revision >= 1),
    actor        TEXT NOT NULL,
    reason       TEXT NOT NULL,
    before       JSONB NULL,
    after        JSONB NOT NULL,
    at           TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (workspace_id, revision)
);
