-- Servers (the hosts agents run on, by agent id) marked as HAProxy nodes: an instance with
-- transport `agent` is reached only through its node's agent. Projection of
-- `haproxy.node_marked` (the newest version wins).
CREATE TABLE haproxy_nodes (
    server_id  text        PRIMARY KEY,
    hostname   text        NOT NULL,
    enabled    boolean     NOT NULL,
    version    bigint      NOT NULL,
    marked_by  text        NOT NULL,
    marked_at  timestamptz NOT NULL
);
