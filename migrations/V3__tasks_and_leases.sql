-- Projections of the lease protocol: where each task's lease stands, and every lease event.

-- One row per task entry (agent, kind, stream entry). Current-state columns are set only by an
-- event with a newer per-task version; deliveries and first grant merge order-free.
CREATE TABLE tasks (
    agent_id         text        NOT NULL,
    kind             text        NOT NULL,
    entry            text        NOT NULL,
    -- leased | reported | closed | expired | dead_lettered
    status           text        NOT NULL,
    -- finished | failed | cancelled | timeout | lease_expired | dead_lettered (when ended)
    outcome          text,
    epoch            bigint      NOT NULL DEFAULT 0,
    deliveries       bigint      NOT NULL DEFAULT 0,
    lease_deadline   timestamptz,
    result           jsonb,
    -- the version of the report whose result is kept: the earliest, whatever the apply order
    result_version   bigint,
    first_granted_at timestamptz,
    updated_at       timestamptz NOT NULL,
    version          bigint      NOT NULL,
    PRIMARY KEY (agent_id, kind, entry)
);
CREATE INDEX tasks_status ON tasks (status);

-- Every lease event, keyed by event id.
CREATE TABLE lease_history (
    event_id    uuid        PRIMARY KEY,
    agent_id    text        NOT NULL,
    kind        text,
    entry       text,
    type        text        NOT NULL,
    epoch       bigint,
    detail      jsonb       NOT NULL,
    occurred_at timestamptz NOT NULL
);
CREATE INDEX lease_history_task ON lease_history (agent_id, kind, entry);
