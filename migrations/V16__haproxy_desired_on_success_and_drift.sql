-- A failed action leaves a row in its server's history too: the state it asked for and HAProxy's
-- refusal (the state itself did not change).
ALTER TABLE haproxy_server_status_history ADD COLUMN action text, ADD COLUMN error text;

-- Operational, not a projection: servers whose observed admin state differed from the
-- operator's desired state at the polls from `since_poll` to `last_poll` of their instance (a
-- poll that sees them back deletes the row). Off for longer than one poll is drift.
CREATE TABLE haproxy_drift (
    server_id   text        PRIMARY KEY,
    instance_id text        NOT NULL,
    since_poll  bigint      NOT NULL,
    last_poll   bigint      NOT NULL,
    since       timestamptz NOT NULL
);
CREATE INDEX haproxy_drift_instance ON haproxy_drift (instance_id);
