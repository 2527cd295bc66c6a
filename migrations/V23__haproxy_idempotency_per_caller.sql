-- An idempotency key is its caller's own: another API key using the same one makes its own
-- action (and learns nothing of the first).
ALTER TABLE haproxy_actions DROP CONSTRAINT haproxy_actions_idempotency_key_key;
CREATE UNIQUE INDEX haproxy_actions_caller_key ON haproxy_actions (requested_by, idempotency_key);
