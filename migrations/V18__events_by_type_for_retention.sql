-- What the retention's snapshots look up in `events` once a day, by index rather than by a
-- scan of every partition: the earlier snapshots (replaced) and the presence transitions
-- (counted). Both are a sliver of the table. Building them reads every partition of `events`
-- and holds back writes to it meanwhile (migrations run in a transaction, so not
-- CONCURRENTLY): on a large installation, migrate at a quiet moment.
CREATE INDEX events_snapshots ON events (type) WHERE type = 'projection.snapshot';
CREATE INDEX events_presence ON events ((payload->>'agent_id'))
    WHERE type IN ('agent.online', 'agent.offline');
