-- Checks, their slots and results: projections of `check.created` and of the lease events of
-- the check's tasks (task id `<check>:<slot>:<attempt>`).

CREATE TABLE checks (
    check_id    uuid        PRIMARY KEY,
    kind        text        NOT NULL,
    target      text        NOT NULL,
    options     jsonb       NOT NULL,
    selection   jsonb       NOT NULL,
    -- queued | in_progress | finished
    status      text        NOT NULL,
    slots       integer     NOT NULL,
    slots_done  integer     NOT NULL DEFAULT 0,
    -- bumped by each result, in the result's own transaction (under this row's lock), so
    -- results appear in seq order: the id of live (SSE) events
    seq         bigint      NOT NULL DEFAULT 0,
    -- bumped by any change of the check or its slots: the ETag
    revision    bigint      NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL,
    created_by  text        NOT NULL,
    deadline    timestamptz NOT NULL,
    finished_at timestamptz
);
CREATE INDEX checks_created ON checks (created_at DESC, check_id);
CREATE INDEX checks_open ON checks (deadline) WHERE status <> 'finished';

CREATE TABLE check_slots (
    check_id    uuid        NOT NULL REFERENCES checks ON DELETE CASCADE,
    slot        integer     NOT NULL,
    -- the current attempt, and its agent (null when none could be found)
    attempt     integer     NOT NULL,
    agent_id    text,
    -- which `locations` entry the slot is for
    constraint_index integer,
    -- pending | leased | done
    status      text        NOT NULL,
    -- finished | failed | cancelled | timeout | lease_expired | dead_lettered | no_agent
    outcome     text,
    result      jsonb,
    country     text,
    city        text,
    asn         bigint,
    network     text,
    -- the check's seq when this slot's result was recorded
    seq         bigint,
    started_at  timestamptz,
    done_at     timestamptz,
    PRIMARY KEY (check_id, slot)
);
CREATE INDEX check_slots_agent ON check_slots (agent_id);

-- Operational state, not a projection: when each agent was last chosen, so selection rotates
-- among equals.
CREATE TABLE agent_selection (
    agent_id         text        PRIMARY KEY,
    last_selected_at timestamptz NOT NULL,
    selections       bigint      NOT NULL DEFAULT 0
);
