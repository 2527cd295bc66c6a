-- Operator API keys and the audit log; both are projections of `key.*` (and later other
-- operator) events, so `rebuild` reproduces them.

CREATE TABLE api_keys (
    key_id      text        PRIMARY KEY,
    name        text        NOT NULL,
    role        text        NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    -- SHA-256 of the whole key, hex; the key itself is never stored
    key_hash    text        NOT NULL,
    created_at  timestamptz NOT NULL,
    created_by  text        NOT NULL,
    revoked_at  timestamptz,
    revoked_by  text
);
CREATE INDEX api_keys_name ON api_keys (name);

-- One row per operator action, keyed by its event.
CREATE TABLE audit_log (
    event_id    uuid        PRIMARY KEY,
    occurred_at timestamptz NOT NULL,
    actor       text        NOT NULL,
    action      text        NOT NULL,
    object      text        NOT NULL,
    details     jsonb       NOT NULL
);
CREATE INDEX audit_log_time ON audit_log (occurred_at, event_id);
CREATE INDEX audit_log_action ON audit_log (action, occurred_at);
CREATE INDEX audit_log_actor ON audit_log (actor, occurred_at);
