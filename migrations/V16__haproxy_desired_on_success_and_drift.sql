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

-- Installations from before kept the desired state of every action requested, refused ones
-- included; it becomes what the last successful action set, as the projection keeps it now
-- (and as a rebuild from events makes it).
UPDATE haproxy_servers s
SET desired_state = a.action, desired_by = a.requested_by, desired_at = a.updated_at
FROM (SELECT DISTINCT ON (server_id) server_id, action, requested_by, updated_at
      FROM haproxy_actions WHERE status = 'success'
      ORDER BY server_id, updated_at DESC, action_id DESC) a
WHERE s.server_id = a.server_id;
UPDATE haproxy_servers SET desired_state = NULL, desired_by = NULL, desired_at = NULL
WHERE desired_state IS NOT NULL
  AND server_id NOT IN (SELECT server_id FROM haproxy_actions WHERE status = 'success');
