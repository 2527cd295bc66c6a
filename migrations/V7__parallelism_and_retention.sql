-- Per-check parallelism: slots beyond `max_parallel` start `waiting` and are released by the
-- scheduler as earlier ones end (`check.slots_released`). Null: all at once.
ALTER TABLE checks ADD COLUMN max_parallel integer;
CREATE INDEX check_slots_waiting ON check_slots (check_id, slot) WHERE status = 'waiting';
-- Sent but not yet claimed: what the scheduler looks at when their agent goes offline.
CREATE INDEX check_slots_pending ON check_slots (agent_id) WHERE status = 'pending';
-- Retention of results goes by the check's end.
CREATE INDEX checks_finished ON checks (finished_at) WHERE status = 'finished';

-- Operational data, not a projection: what agents report of themselves
-- (`POST /v1/agents/metrics`), kept for `METRICS_RETENTION`.
CREATE TABLE agent_metrics (
    agent_id    text        NOT NULL,
    recorded_at timestamptz NOT NULL,
    metrics     jsonb       NOT NULL,
    PRIMARY KEY (agent_id, recorded_at)
);
CREATE INDEX agent_metrics_time ON agent_metrics (recorded_at);
