-- Operational, not a projection: the fencing token of each instance's current owner. An owner
-- writes its token when it takes the instance; an action update made under an older token is
-- refused, so a replica paused past its lease cannot record over the next owner's work.
CREATE TABLE haproxy_fences (
    instance_id text        PRIMARY KEY,
    token       bigint      NOT NULL,
    owner       text        NOT NULL,
    updated_at  timestamptz NOT NULL
);
