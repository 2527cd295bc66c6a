-- HAProxy instances, their backends and servers as polls see them, and each server's state
-- history. Projections of the `haproxy` events (rebuild replays them).
CREATE TABLE haproxy_instances (
    instance_id  text        PRIMARY KEY,
    name         text        NOT NULL,
    transport    text        NOT NULL,
    address      text        NOT NULL,
    node         text,
    created_at   timestamptz NOT NULL,
    created_by   text        NOT NULL,
    removed_at   timestamptz,
    -- the newest poll projected
    last_poll    bigint      NOT NULL DEFAULT 0,
    last_poll_at timestamptz
);
CREATE UNIQUE INDEX haproxy_instances_name ON haproxy_instances (name) WHERE removed_at IS NULL;

CREATE TABLE haproxy_backends (
    backend_id   text        PRIMARY KEY,
    instance_id  text        NOT NULL,
    name         text        NOT NULL,
    first_seen   timestamptz NOT NULL,
    UNIQUE (instance_id, name)
);

CREATE TABLE haproxy_servers (
    server_id     text        PRIMARY KEY,
    instance_id   text        NOT NULL,
    backend_id    text        NOT NULL,
    backend       text        NOT NULL,
    name          text        NOT NULL,
    -- observed: what HAProxy said last (the poll that said it in observed_poll)
    address       text,
    port          integer,
    weight        integer,
    op_state      text,
    admin_state   text,
    admin_bits    integer,
    status        text,
    check_status  text,
    scur          bigint,
    observed_poll bigint      NOT NULL DEFAULT 0,
    observed_at   timestamptz,
    -- successful polls in a row that did not see it; two soft-delete it
    missed_polls  integer     NOT NULL DEFAULT 0,
    missed_poll   bigint      NOT NULL DEFAULT 0,
    removed_at    timestamptz,
    -- desired: what operators asked for, kept apart from what HAProxy says
    desired_state text,
    desired_by    text,
    desired_at    timestamptz,
    UNIQUE (instance_id, backend, name)
);
CREATE INDEX haproxy_servers_backend ON haproxy_servers (backend_id);

CREATE TABLE haproxy_server_status_history (
    event_id        uuid        PRIMARY KEY,
    server_id       text        NOT NULL,
    occurred_at     timestamptz NOT NULL,
    previous_state  text,
    new_state       text        NOT NULL,
    previous_status text,
    new_status      text,
    changed_by      text        NOT NULL,
    poll            bigint      NOT NULL
);
CREATE INDEX haproxy_history_server ON haproxy_server_status_history (server_id, occurred_at);

-- Operational, not a projection: each instance's poll counter, so every poll (whichever
-- replica makes it) has its own number and event ids never collide.
CREATE TABLE haproxy_poll_seq (
    instance_id text   PRIMARY KEY,
    seq         bigint NOT NULL
);
