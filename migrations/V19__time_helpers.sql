-- The time conversions queries share, defined once: instants as API text (RFC 3339 in UTC,
-- to the millisecond), as milliseconds since the Unix epoch (what events carry), and back.
CREATE FUNCTION cp_rfc3339(t timestamptz) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"');

CREATE FUNCTION cp_ms(t timestamptz) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN (extract(epoch FROM t) * 1000)::bigint;

CREATE FUNCTION cp_at_ms(ms bigint) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN 'epoch'::timestamptz + ms * interval '1 millisecond';
