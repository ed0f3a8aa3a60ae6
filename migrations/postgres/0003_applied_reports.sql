-- The latest report, per (workspace, instance), of the env an instance was started with:
-- the revision and mode of the BuildEnv result the provisioner applied. ListDrift compares
-- these with the current decision.
CREATE TABLE billing_applied (
    workspace_id UUID NOT NULL REFERENCES billing_records (workspace_id),
    instance     TEXT NOT NULL CHECK (octet_length(instance) BETWEEN 1 AND 256),
    revision     BIGINT NOT NULL CHECK (revision >= 1),
    mode         TEXT NOT NULL CHECK (mode IN ('platform_managed', 'byok', 'disabled')),
    reported_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (workspace_id, instance)
);
