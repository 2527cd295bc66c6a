-- The event log, its outbox, parked projection failures, and the agent registry.
--
-- Projection tables are exactly what `apply` writes; `rebuild` truncates and replays them.
-- Tables marked OPERATIONAL hold state that is not derived from events and is never rebuilt.

-- Every event, partitioned by day on occurred_at. The key includes occurred_at because a
-- partitioned table's keys must; an event always carries the same occurred_at, so event_id
-- alone is what identifies it. events_default catches anything outside the daily partitions.
CREATE TABLE events (
    event_id     uuid        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    type         text        NOT NULL,
    aggregate_id text        NOT NULL,
    version      bigint      NOT NULL,
    actor        text        NOT NULL,
    schema       integer     NOT NULL,
    payload      jsonb       NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);

CREATE TABLE events_default PARTITION OF events DEFAULT;
CREATE INDEX events_aggregate ON events (aggregate_id, version);

-- Create the partition of one day, moving any rows the default partition holds for it.
CREATE FUNCTION cp_ensure_event_partition(day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    name text := 'events_p' || to_char(day, 'YYYYMMDD');
BEGIN
    PERFORM pg_advisory_xact_lock(7105033523614889);
    IF to_regclass(name) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE events INCLUDING DEFAULTS)', name);
    EXECUTE format(
        'WITH moved AS (DELETE FROM events_default WHERE occurred_at >= %L AND occurred_at < %L RETURNING *) '
        'INSERT INTO %I SELECT * FROM moved', day, day + 1, name);
    EXECUTE format('ALTER TABLE events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
        name, day, day + 1);
    RETURN true;
END $$;

SELECT cp_ensure_event_partition((current_date + d)::date) FROM generate_series(-1, 7) AS d;

-- OPERATIONAL: events committed by the edge and not yet published to their stream. The
-- gateway deletes its row right after publishing; the scheduler's sweep publishes the rest.
CREATE TABLE outbox (
    event_id   uuid        PRIMARY KEY,
    stream     text        NOT NULL,
    event      jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_created ON outbox (created_at);

-- OPERATIONAL: stream entries that failed to apply too often, parked so the stream flows.
CREATE TABLE projection_failures (
    stream         text        NOT NULL,
    entry_id       text        NOT NULL,
    consumer_group text        NOT NULL,
    event_id       uuid,
    attempts       integer     NOT NULL,
    error          text        NOT NULL,
    entry          text        NOT NULL,
    parked_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, consumer_group, entry_id)
);

-- Projection: agents. Identity columns are set by agent.registered events (identity_version);
-- status by agent.online / agent.offline (status_version). A presence event may arrive first,
-- so identity columns may be NULL until the registration is applied.
CREATE TABLE agents (
    agent_id          text        PRIMARY KEY,
    hostname          text,
    token_hash        text,
    labels            jsonb       NOT NULL DEFAULT '{}',
    capabilities      jsonb       NOT NULL DEFAULT '{}',
    country           text,
    city              text,
    asn               bigint,
    network           text,
    location_source   text,
    address           text,
    agent_version     text,
    registered_at     timestamptz,
    updated_at        timestamptz,
    identity_version  bigint      NOT NULL DEFAULT 0,
    status            text        NOT NULL DEFAULT 'registered',
    status_changed_at timestamptz,
    status_version    bigint      NOT NULL DEFAULT 0,
    status_changes    bigint      NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX agents_hostname ON agents (hostname) WHERE hostname IS NOT NULL;
CREATE INDEX agents_status ON agents (status);
CREATE INDEX agents_country ON agents (country);

-- Projection: every presence transition.
CREATE TABLE agent_status_history (
    event_id    uuid        PRIMARY KEY,
    agent_id    text        NOT NULL,
    status      text        NOT NULL,
    version     bigint      NOT NULL,
    reason      text        NOT NULL,
    occurred_at timestamptz NOT NULL
);
CREATE INDEX agent_status_history_agent ON agent_status_history (agent_id, version);

-- OPERATIONAL: when each agent was last heard from (heartbeats are not events).
CREATE TABLE agent_last_seen (
    agent_id  text        PRIMARY KEY,
    last_seen timestamptz NOT NULL
);
