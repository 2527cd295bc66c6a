# Sourced by scripts/backup and scripts/restore: DATABASE_URL (or DATABASE_URL_FILE) split into
# a URL without its password ($DBURL, for the command line, which ps shows) and PGPASSWORD
# (the environment, which it does not).
if [ -z "${DATABASE_URL:-}" ] && [ -n "${DATABASE_URL_FILE:-}" ]; then
    DATABASE_URL="$(cat "$DATABASE_URL_FILE")" || die "cannot read DATABASE_URL_FILE"
fi
[ -n "${DATABASE_URL:-}" ] || die "DATABASE_URL (or DATABASE_URL_FILE) is not set"
if [[ "$DATABASE_URL" =~ ^(postgres(ql)?://)([^:@/]*):([^@/]*)@(.*)$ ]]; then
    # Percent-encoded in the URL: decoded for libpq.
    PGPASSWORD="$(printf '%b' "${BASH_REMATCH[4]//%/\\x}")"
    export PGPASSWORD
    DBURL="${BASH_REMATCH[1]}${BASH_REMATCH[3]}@${BASH_REMATCH[5]}"
else
    DBURL="$DATABASE_URL"
fi
unset DATABASE_URL
