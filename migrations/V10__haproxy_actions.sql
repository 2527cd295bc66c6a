-- Operators' drain / maint / ready of HAProxy servers: pending -> running -> success | failed.
CREATE TABLE haproxy_actions (
    action_id       text        PRIMARY KEY,
    idempotency_key text        NOT NULL UNIQUE,
    server_id       text        NOT NULL,
    instance_id     text        NOT NULL,
    backend         text        NOT NULL,
    server          text        NOT NULL,
    action          text        NOT NULL,
    drain_wait_ms   bigint      NOT NULL DEFAULT 0,
    status          text        NOT NULL,
    -- the newest update applied (1 requested, then each update's version)
    version         bigint      NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    detail          jsonb,
    error           text,
    requested_by    text        NOT NULL,
    requested_at    timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX haproxy_actions_open ON haproxy_actions (instance_id, requested_at)
    WHERE status IN ('pending', 'running');

-- Operational, not a projection: each instance's circuit breaker as its owner last left it
-- (closed, open, half_open), for the API.
CREATE TABLE haproxy_breakers (
    instance_id text        PRIMARY KEY,
    state       text        NOT NULL,
    failures    integer     NOT NULL,
    opened_at   timestamptz,
    updated_at  timestamptz NOT NULL
);

-- What the last poll of each instance saw of the process: a new Pid or a smaller Uptime_sec
-- means HAProxy restarted or reloaded (and lost its runtime state).
ALTER TABLE haproxy_poll_seq ADD COLUMN pid bigint, ADD COLUMN uptime_sec bigint;
