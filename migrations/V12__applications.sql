-- Applications and application groups (projections of `application.created` and
-- `application_group.created`), and which HAProxy server belongs to which application.
CREATE TABLE applications (
    application_id text        PRIMARY KEY,
    name           text        NOT NULL UNIQUE,
    -- with a port, servers link by IP:port (an address of `addresses` and this port);
    -- without, by the name template {hostname}_{name}_{instance}
    port           integer,
    addresses      text[]      NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL,
    created_by     text        NOT NULL
);

CREATE TABLE application_groups (
    group_id   text        PRIMARY KEY,
    name       text        NOT NULL UNIQUE,
    created_at timestamptz NOT NULL,
    created_by text        NOT NULL
);

CREATE TABLE application_group_members (
    group_id       text NOT NULL,
    application_id text NOT NULL,
    PRIMARY KEY (group_id, application_id)
);

-- The link of each server, worked out from what identifies the server to HAProxy's side
-- of the fleet (its address and port, or its name), never from its backend: a server seen
-- under a renamed backend is a new row with the same link. Computed when read, so it does
-- not depend on whether the application or the server was projected first.
CREATE VIEW haproxy_server_applications AS
SELECT s.server_id, a.application_id, a.name AS application,
       CASE WHEN a.port IS NOT NULL THEN 'address' ELSE 'name' END AS matched_by
FROM haproxy_servers s
JOIN applications a ON
    (a.port IS NOT NULL AND s.port = a.port AND s.address = ANY (a.addresses))
    OR (a.port IS NULL AND s.name ~ ('^[^_]+_' || a.name || '_[^_]+$'));
