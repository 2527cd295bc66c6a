-- cp_ms and cp_at_ms compute with stable functions (extract from and + interval on
-- timestamptz), so they are declared STABLE: PostgreSQL inlines a SQL function only when its
-- declared volatility is no stricter than its body's, and V19 declared them IMMUTABLE.
CREATE OR REPLACE FUNCTION cp_ms(t timestamptz) RETURNS bigint
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN (extract(epoch FROM t) * 1000)::bigint;

CREATE OR REPLACE FUNCTION cp_at_ms(ms bigint) RETURNS timestamptz
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN 'epoch'::timestamptz + ms * interval '1 millisecond';

-- Events schema 2: actors are <kind>:<name>. The upcaster reads a schema-1 bare `cli` as
-- `cli:unknown` and any other bare name as `system:<name>`; the rows projected from such
-- events before the upgrade say the same, so a rebuild reproduces them.
CREATE FUNCTION pg_temp.cp_actor(a text) RETURNS text LANGUAGE sql IMMUTABLE
    RETURN CASE WHEN a IS NULL OR a LIKE '%:%' THEN a
                WHEN a = 'cli' THEN 'cli:unknown'
                ELSE 'system:' || a END;

UPDATE api_keys SET created_by = pg_temp.cp_actor(created_by) WHERE created_by NOT LIKE '%:%';
UPDATE api_keys SET revoked_by = pg_temp.cp_actor(revoked_by) WHERE revoked_by NOT LIKE '%:%';
UPDATE audit_log SET actor = pg_temp.cp_actor(actor) WHERE actor NOT LIKE '%:%';
UPDATE checks SET created_by = pg_temp.cp_actor(created_by) WHERE created_by NOT LIKE '%:%';
UPDATE haproxy_instances SET created_by = pg_temp.cp_actor(created_by)
    WHERE created_by NOT LIKE '%:%';
UPDATE haproxy_servers SET desired_by = pg_temp.cp_actor(desired_by) WHERE desired_by NOT LIKE '%:%';
UPDATE haproxy_actions SET requested_by = pg_temp.cp_actor(requested_by)
    WHERE requested_by NOT LIKE '%:%';
UPDATE haproxy_nodes SET marked_by = pg_temp.cp_actor(marked_by) WHERE marked_by NOT LIKE '%:%';
UPDATE applications SET created_by = pg_temp.cp_actor(created_by) WHERE created_by NOT LIKE '%:%';
UPDATE application_groups SET created_by = pg_temp.cp_actor(created_by)
    WHERE created_by NOT LIKE '%:%';
