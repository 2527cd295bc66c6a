-- Agents' concurrency controller snapshots (POST /v1/agents/metrics): telemetry written by the
-- gateway as it arrives, like agent_metrics; kept for METRICS_RETENTION.
CREATE TABLE concurrency_windows (
    agent_id     text        NOT NULL,
    recorded_at  timestamptz NOT NULL,
    window_size  integer     NOT NULL,
    max_window   integer     NOT NULL,
    inflight     integer     NOT NULL,
    queued       integer     NOT NULL,
    backpressure boolean     NOT NULL,
    -- what made the controller shrink the window (timeouts, queueing, lag), when it did
    reason       text,
    PRIMARY KEY (agent_id, recorded_at)
);
CREATE INDEX concurrency_windows_time ON concurrency_windows (recorded_at);
