//! Every environment variable any checkplane binary reads, in one table.
//!
//! It serves three purposes: a service accepts a project-prefixed variable that another service
//! documents (one env file may serve several binaries), typos get a "did you mean", and a test
//! checks that the README's configuration table lists exactly these.

/// One documented variable.
#[derive(Debug, Clone, Copy)]
pub struct Var {
    pub name: &'static str,
    /// Which binaries read it.
    pub services: &'static str,
    /// The default, or `required` / `-` (unset).
    pub default: &'static str,
    /// What it means.
    pub doc: &'static str,
    /// A secret: may come from `<name>_FILE` and never prints.
    pub secret: bool,
}

const DB: &str = "gateway, scheduler, haproxy-sync";
const ALL_SERVICES: &str = "all";

/// The table.
pub const ALL: &[Var] = &[
    Var {
        name: "DATABASE_URL",
        services: DB,
        default: "required",
        doc: "PostgreSQL connection string (`postgres://user:pass@host:port/db`)",
        secret: true,
    },
    Var {
        name: "DATABASE_POOL_SIZE",
        services: DB,
        default: "16",
        doc: "connections in the PostgreSQL work pool (1-512); each keeps the statements it ran prepared",
        secret: false,
    },
    Var {
        name: "REDIS_URL",
        services: DB,
        default: "-",
        doc: "Redis URL (`redis://[:pass@]host:port[/db]`); or use REDIS_ADDR",
        secret: true,
    },
    Var {
        name: "REDIS_ADDR",
        services: DB,
        default: "127.0.0.1:6379",
        doc: "Redis `host:port`, used when REDIS_URL is unset",
        secret: false,
    },
    Var {
        name: "REDIS_PASSWORD",
        services: DB,
        default: "-",
        doc: "Redis password, with REDIS_ADDR",
        secret: true,
    },
    Var {
        name: "REDIS_POOL_SIZE",
        services: DB,
        default: "16",
        doc: "connections in the Redis work pool (1-512)",
        secret: false,
    },
    Var {
        name: "STREAM_PREFIX",
        services: DB,
        default: "cp",
        doc: "prefix of every Redis key (letters, digits, `-`, `_`; up to 32)",
        secret: false,
    },
    Var {
        name: "STREAM_SHARDS",
        services: DB,
        default: "4",
        doc: "number of lease shards, fixed at install (1-1024)",
        secret: false,
    },
    Var {
        name: "MIGRATE_ON_START",
        services: DB,
        default: "true",
        doc: "apply pending migrations at start (serialised by an advisory lock)",
        secret: false,
    },
    Var {
        name: "HTTP_ADDR",
        services: DB,
        default: "gateway 0.0.0.0:8080, scheduler 0.0.0.0:8081, haproxy-sync 0.0.0.0:8082",
        doc: "listen address: the API (gateway) or the health/metrics port",
        secret: false,
    },
    Var {
        name: "LOG_FORMAT",
        services: ALL_SERVICES,
        default: "text",
        doc: "`text` (human-readable) or `json`, to stderr",
        secret: false,
    },
    Var {
        name: "LOG_LEVEL",
        services: ALL_SERVICES,
        default: "info",
        doc: "tracing filter, e.g. `info` or `gateway=debug,info`",
        secret: false,
    },
    Var {
        name: "LOG_FILE",
        services: ALL_SERVICES,
        default: "-",
        doc: "write logs to this file (absolute path, its directory must exist; created mode 0640, appended to) instead of stderr; reopened on SIGHUP, so logrotate renames it and signals (the logrotate file `infra/ansible` installs). Under systemd leave it unset: stderr goes to journald",
        secret: false,
    },
    Var {
        name: "SHUTDOWN_TIMEOUT",
        services: ALL_SERVICES,
        default: "10s",
        doc:
            "after SIGTERM/SIGINT, how long in-flight work may take before the process exits anyway",
        secret: false,
    },
    Var {
        name: "READY_TIMEOUT",
        services: ALL_SERVICES,
        default: "1s",
        doc: "how long `/readyz` waits for each dependency",
        secret: false,
    },
    Var {
        name: "METRICS_ALLOW_PUBLIC",
        services: ALL_SERVICES,
        default: "false",
        doc: "serve `/metrics` to non-loopback clients without a key",
        secret: false,
    },
    Var {
        name: "METRICS_API_KEY",
        services: ALL_SERVICES,
        default: "-",
        doc: "`X-API-Key` that unlocks `/metrics` for non-loopback clients",
        secret: true,
    },
    Var {
        name: "HTTP_HEADER_TIMEOUT",
        services: ALL_SERVICES,
        default: "10s",
        doc: "from a request head's first byte to its end (100ms-5m); a half-sent head is closed after it",
        secret: false,
    },
    Var {
        name: "HTTP_BODY_TIMEOUT",
        services: ALL_SERVICES,
        default: "30s",
        doc: "from a request's head to its body's end (100ms-10m); a slower body is answered 408 `ERR_REQUEST_TIMEOUT` and its connection closed",
        secret: false,
    },
    Var {
        name: "HTTP_IDLE_TIMEOUT",
        services: ALL_SERVICES,
        default: "60s",
        doc: "how long (100ms-1h) a connection with no request in flight and none arriving stays open",
        secret: false,
    },
    Var {
        name: "HTTP_MAX_CONNECTIONS",
        services: ALL_SERVICES,
        default: "4096",
        doc: "open connections (16-1000000), lowered at start to the descriptors `RLIMIT_NOFILE` allows less 640 (logged); at the cap a new connection closes the oldest idle one, or is answered 503 when none is idle",
        secret: false,
    },
    Var {
        name: "HTTP_MAX_CONNECTIONS_PER_ADDRESS",
        services: ALL_SERVICES,
        default: "256",
        doc: "open connections from one client address (0: no cap), the oldest idle of that address closed first; raise it, or set 0, behind a proxy whose address every client shares",
        secret: false,
    },
    Var {
        name: "HTTP_MAX_URI_BYTES",
        services: ALL_SERVICES,
        default: "8192",
        doc: "bytes of a request's path and query (256-65536); over it: 414 `ERR_URI_TOO_LONG`",
        secret: false,
    },
    Var {
        name: "HTTP_MAX_HEADERS",
        services: ALL_SERVICES,
        default: "64",
        doc: "header fields in a request (8-256); over it: 431 `ERR_HEADERS_TOO_LARGE`",
        secret: false,
    },
    Var {
        name: "HTTP_MAX_HEADER_BYTES",
        services: ALL_SERVICES,
        default: "16384",
        doc: "bytes of a request's header names and values (1024-262144); over it: 431 `ERR_HEADERS_TOO_LARGE`",
        secret: false,
    },
    Var { name: "HAPROXY_ACTION_PARALLELISM", services: "haproxy-sync", default: "4", doc: "actions (1-64) running at once on one HAProxy instance (a batch included); the rest wait their turn", secret: false },
    Var { name: "HAPROXY_ACTION_RETRY_BASE", services: "haproxy-sync", default: "1s", doc: "first retry delay (10ms-1m) of an action that could not reach HAProxy; then 2x and 4x", secret: false },
    Var { name: "HAPROXY_ALLOWED_ADDRESSES", services: "gateway, haproxy-sync", default: "127.0.0.0/8,::1/128,/run/haproxy", doc: "where haproxy-sync may reach an instance directly: CIDRs (or addresses) and socket directories, comma-separated; the gateway refuses to register a direct instance outside them, haproxy-sync to connect outside them (a socket path resolved, symlinks and all)", secret: false },
    Var { name: "HAPROXY_BREAKER_COOLDOWN", services: "haproxy-sync", default: "1m", doc: "how long (100ms-1h) an instance's open circuit breaker fails actions fast before one trial", secret: false },
    Var { name: "HAPROXY_RELOAD_PROBE_INTERVAL", services: "haproxy-sync", default: "2s", doc: "how often (500ms-1h) each owned HAProxy instance is asked for its Pid and uptime between polls: a restart or reload is polled at once and the desired states re-applied", secret: false },
    Var { name: "HAPROXY_SYNC_INTERVAL", services: "haproxy-sync", default: "1m", doc: "how often (1s-1h, jittered ±10 %) each HAProxy instance is polled; a new instance at once", secret: false },
    Var { name: "HAPROXY_SYNC_LEASE", services: "haproxy-sync", default: "15s", doc: "how long (2s-10m) a replica's claim on an instance lasts unrenewed: a dead replica's instances move within it", secret: false },
    Var { name: "HAPROXY_SYNC_TIMEOUT", services: "haproxy-sync", default: "5s", doc: "how long (100ms-1m) one Runtime API command may take (connecting: at most 2 s of it)", secret: false },
    Var {
        name: "AGENT_CONTROL_PLANE",
        services: "agent",
        default: "required",
        doc: "base URL of the gateway, e.g. `https://gateway.example:8443` (plain `http://` only with `AGENT_ALLOW_PLAINTEXT`)",
        secret: false,
    },
    Var { name: "AGENT_CA_FILE", services: "agent", default: "-", doc: "the only roots the control plane's certificate is checked against (PEM, one or more); unset, the system's roots (`/etc/ssl/certs`)", secret: false },
    Var { name: "AGENT_ALLOW_PLAINTEXT", services: "agent", default: "false", doc: "accept a plain `http://` `AGENT_CONTROL_PLANE` (the token crosses the network in clear: only for a gateway on the same host); without it the agent refuses to start", secret: false },
    Var {
        name: "AGENT_HEALTH_ADDR",
        services: "agent",
        default: "127.0.0.1:9100",
        doc: "the agent's own `/livez` `/readyz` `/metrics` port",
        secret: false,
    },
    Var { name: "AGENT_ID", services: "agent", default: "-", doc: "the agent's id, with AGENT_AUTH_TOKEN; otherwise the identity comes from AGENT_STATE_FILE or a registration", secret: false },
    Var { name: "AGENT_AUTH_TOKEN", services: "agent", default: "-", doc: "the agent's token (`X-Agent-Token`), with AGENT_ID", secret: true },
    Var { name: "AGENT_ENROLLMENT_TOKEN", services: "agent", default: "-", doc: "what the agent registers with when AGENT_STATE_FILE holds no identity (the gateway's GATEWAY_ENROLLMENT_TOKEN)", secret: true },
    Var { name: "AGENT_STATE_FILE", services: "agent", default: "/var/lib/checkplane-agent/state.json", doc: "where the agent keeps the identity it registered with (written atomically, mode 0600), so a restart resumes as the same agent", secret: false },
    Var { name: "AGENT_HOSTNAME", services: "agent", default: "host name", doc: "the name the agent registers with; a known name re-registering rotates its token", secret: false },
    Var { name: "AGENT_POOL_DNS_SIZE", services: "agent", default: "32", doc: "dns checks (0-1024) the agent runs at once; it claims no more than this; 0: it does not run dns checks", secret: false },
    Var { name: "AGENT_POOL_HTTP_SIZE", services: "agent", default: "16", doc: "http checks (0-1024) the agent runs at once; it claims no more than this; 0: it does not run http checks", secret: false },
    Var { name: "AGENT_POOL_TCP_SIZE", services: "agent", default: "16", doc: "tcp checks (0-1024) the agent runs at once; it claims no more than this; 0: it does not run tcp checks", secret: false },
    Var { name: "AGENT_POOL_PING_SIZE", services: "agent", default: "8", doc: "ping checks (0-1024) the agent runs at once; it claims no more than this; 0: it does not run ping checks", secret: false },
    Var { name: "AGENT_POOL_TRACE_SIZE", services: "agent", default: "4", doc: "trace checks (0-1024) the agent runs at once; it claims no more than this; 0: it does not run trace checks", secret: false },
    Var { name: "AGENT_TRACE_RUNTIME_WORKERS", services: "agent", default: "1", doc: "threads (1-64) of the runtime of its own that trace checks run on, apart from the other checks", secret: false },
    Var { name: "AGENT_HAPROXY_SOCKET", services: "agent", default: "-", doc: "this host's HAProxy Runtime API (an absolute unix socket path or host:port): the agent relays haproxy-sync's commands to it (tasks of kind haproxy; only the commands checkplane sends); unset: no relay", secret: false },
    Var { name: "AGENT_POOL_HAPROXY_SIZE", services: "agent", default: "2", doc: "relayed HAProxy commands (1-16) run at once, outside the checks' concurrency window (only with AGENT_HAPROXY_SOCKET)", secret: false },
    Var { name: "AGENT_DNS_LISTEN", services: "agent", default: "-", doc: "where the caching DNS proxy listens (UDP and TCP), e.g. 127.0.0.1:5353; unset: no proxy", secret: false },
    Var { name: "AGENT_DNS_UPSTREAM", services: "agent", default: "-", doc: "the resolver the proxy forwards to, ip or ip:port (required with AGENT_DNS_LISTEN)", secret: false },
    Var { name: "AGENT_DNS_UPSTREAM_TIMEOUT_MS", services: "agent", default: "2000", doc: "how long (50-30000 ms) the proxy waits for the upstream", secret: false },
    Var { name: "AGENT_DNS_CACHE_SIZE", services: "agent", default: "10000", doc: "most answers (1-1000000) the proxy caches, each at most 4 kB", secret: false },
    Var { name: "AGENT_DNS_MAX_INFLIGHT", services: "agent", default: "1024", doc: "most queries (1-65536) waiting for the upstream at once, those joining a question already asked included; past it, SERVFAIL", secret: false },
    Var { name: "AGENT_DNS_ALLOW_FROM", services: "agent", default: "loopback", doc: "the clients the DNS proxy answers: CIDRs or addresses, comma-separated (at most 256); others get nothing (UDP) or a closed connection (TCP). Required when `AGENT_DNS_LISTEN` is not a loopback address: an open resolver answers anyone, and amplifies for them", secret: false },
    Var { name: "AGENT_DNS_STALE_SECS", services: "agent", default: "3600", doc: "how long (0-604800 s) past its TTL an answer may be served (TTL 30) while the upstream fails", secret: false },
    Var { name: "AGENT_METRICS_INTERVAL", services: "agent", default: "1m", doc: "how often (1s-1h) the agent sends its metrics and concurrency snapshots (`POST /v1/agents/metrics`)", secret: false },
    Var { name: "AGENT_MAX_INFLIGHT", services: "agent", default: "64", doc: "most checks (1-4096) in flight across all kinds: where the concurrency window starts and the most it grows back to after shrinking under overload", secret: false },
    Var { name: "AGENT_ALLOW_PRIVATE_TARGETS", services: "agent", default: "false", doc: "let checks reach loopback, private and reserved addresses (checked after resolution and at connect)", secret: false },
    Var { name: "GATEWAY_ENROLLMENT_TOKEN", services: "gateway", default: "-", doc: "what agents present as `X-Enrollment-Token` to register (16+ characters); unset disables registration", secret: true },
    Var { name: "GATEWAY_ADMIN_KEY", services: "gateway", default: "-", doc: "bootstrap `X-API-Key` with the admin role, to make the first keys (16+ characters)", secret: true },
    Var { name: "HEARTBEAT_INTERVAL", services: "gateway", default: "10s", doc: "how often agents heartbeat (`next_deadline_ms`)", secret: false },
    Var { name: "GEOIP_CITY_DB", services: "gateway", default: "-", doc: "MaxMind City database: country and city of agents that declare no location", secret: false },
    Var { name: "GEOIP_ASN_DB", services: "gateway", default: "-", doc: "MaxMind ASN database: ASN and network of agents that declare no location", secret: false },
    Var { name: "CONSUMER_NAME", services: "scheduler", default: "host name", doc: "this replica's stable name in Redis consumer groups", secret: false },
    Var { name: "PROJECTION_DEGRADED_LAG", services: "scheduler", default: "10000", doc: "events (1-100000000) the projector may be behind, summed over its streams, before `/healthz` and `scheduler healthcheck` say DEGRADED", secret: false },
    Var { name: "OFFLINE_GRACE", services: "scheduler", default: "30s", doc: "how long past its heartbeat deadline an agent is marked offline", secret: false },
    Var { name: "OUTBOX_MIN_AGE", services: "scheduler", default: "5s", doc: "outbox rows younger than this are left to the gateway that wrote them", secret: false },
    Var { name: "EVENTS_RETENTION", services: "scheduler", default: "30d", doc: "how long `events` are kept (whole days): the window of time-bounded rows (checks, histories, audit) `rebuild` covers; long-lived rows (agents, keys, HAProxy instances and servers, applications) are snapshotted before their events go and always rebuilt", secret: false },
    Var { name: "PROJECTOR_MAX_ATTEMPTS", services: "scheduler", default: "5", doc: "failures before an event is parked in `projection_failures` (1-100)", secret: false },
    Var { name: "LEASE_TTL", services: "gateway", default: "30s", doc: "how long a lease lasts without an extension; an agent's own lease idle this long is handed back to it with a new epoch", secret: false },
    Var { name: "MAX_DELIVERIES", services: "gateway", default: "5", doc: "deliveries of one task before it goes to the dead-letter stream (1-100)", secret: false },
    Var { name: "CLAIM_BLOCK_MS", services: "gateway", default: "20000", doc: "the longest a claim waits for work, in ms (0-120000); `wait_ms` above it is cut to it", secret: false },
    Var { name: "MAX_RETRIES", services: "scheduler", default: "2", doc: "new attempts (0-10) of a check slot whose agent went away, each on another matching agent", secret: false },
    Var { name: "RETRY_BACKOFF", services: "scheduler", default: "2s", doc: "how long an interrupted check slot waits before its next attempt (0s-10m); kept in PostgreSQL, so it survives a restart", secret: false },
    Var { name: "DEFAULT_MAX_PARALLEL", services: "gateway", default: "100", doc: "slots of one check (1-1000) that run at once when the check gives no `max_parallel`; the rest wait until earlier ones end", secret: false },
    Var { name: "RESULTS_RETENTION", services: "scheduler", default: "30d", doc: "how long finished checks and their results are kept (1h-10y), deleted in bounded batches", secret: false },
    Var { name: "HAPROXY_HISTORY_RETENTION", services: "scheduler", default: "30d", doc: "how long HAProxy servers' state history is kept (1h-10y), deleted in bounded batches", secret: false },
    Var { name: "METRICS_RETENTION", services: "scheduler", default: "30d", doc: "how long agents' reported metrics are kept (1h-10y), deleted in bounded batches", secret: false },
    Var { name: "GATEWAY_ALLOW_PRIVATE_TARGETS", services: "gateway", default: "false", doc: "accept check targets in loopback, private, link-local and reserved ranges (for checking your own network; the tests and the stand use loopback targets)", secret: false },
    Var { name: "GATEWAY_LIVE_POLL", services: "gateway", default: "1s", doc: "how often a live stream (or a read with `Prefer: wait`) looks for changes by itself (100ms-60s); the projector's announcements wake it sooner, this covers the ones lost while the subscription reconnects", secret: false },
    Var { name: "GATEWAY_MAX_LIVE_STREAMS", services: "gateway", default: "1000", doc: "live streams and waiting reads of checks open at once on one gateway (1-100000); one more stream is 429", secret: false },
    Var { name: "GATEWAY_RATE_AUTH_FAILURES", services: "gateway", default: "30/1m:30", doc: "failed authentications (unknown agent or token, unknown or revoked API key, wrong enrollment token) one client address (an IPv6 /64) may make; past it every authentication from that address that would ask PostgreSQL is 429 `ERR_RATE_LIMITED` with `Retry-After`, without asking; verified credentials never count. Every `GATEWAY_RATE_*` reads `<count>/<period>[:<burst>]` (period `ms`, `s`, `m`, `h`; burst defaults to the count; at least 1 ms between calls) or `off`, is counted in Redis (shared by every replica; in memory while Redis fails) and answers with `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`; docs/edge.md", secret: false },
    Var { name: "GATEWAY_RATE_REGISTER", services: "gateway", default: "1/10m:3", doc: "registrations of one hostname (`POST /v1/agents/register`): one every ten minutes, three at once so an agent restarted with other kinds registers again at once; a wrong enrollment token counts against the address instead (`GATEWAY_RATE_AUTH_FAILURES`), so many probes behind one NAT enroll at once", secret: false },
    Var { name: "GATEWAY_RATE_HEARTBEAT", services: "gateway", default: "2 per `HEARTBEAT_INTERVAL`, burst 3", doc: "heartbeats of one agent (the agent beats every 0.8 interval: at the 10s default this is 12/1m:3, the seed's 6/min with room for that schedule)", secret: false },
    Var { name: "GATEWAY_RATE_CLAIM", services: "gateway", default: "3000/1m:60", doc: "claims of one agent, a long poll counting once: far above the seed's 12/min because the scheduler hands an agent new tasks as its reports arrive, so each paced claim or report delays its next check; the agent paces itself to 20/s, burst 20, gathering its free workers into one claim (measured: a four-worker agent of 1 ms checks makes 40 claims a second unpaced, and 5/s cut its work from 40 to 10 checks a second)", secret: false },
    Var { name: "GATEWAY_RATE_EXTEND", services: "gateway", default: "6 per `LEASE_TTL`, at least 30/1m, burst 10", doc: "lease extensions of one agent (the agent extends every third of the shortest lease, up to 1000 tokens a call)", secret: false },
    Var { name: "GATEWAY_RATE_REPORT", services: "gateway", default: "3000/1m:60", doc: "result reports of one agent, as claims (the agent paces itself to 20/s, burst 20, up to 100 results a report)", secret: false },
    Var { name: "GATEWAY_RATE_METRICS", services: "gateway", default: "60/1m:10", doc: "metrics reports of one agent (`AGENT_METRICS_INTERVAL` is at least 1s)", secret: false },
    Var { name: "GATEWAY_RATE_OPERATOR", services: "gateway", default: "600/1m:120", doc: "calls of one API key to the operator and HAProxy API (the bootstrap key is one key)", secret: false },
    Var { name: "GATEWAY_TRUSTED_PROXIES", services: "gateway", default: "-", doc: "proxies (addresses and CIDRs, comma-separated, at most 256) whose `X-Forwarded-For` names the client: the last address in it (a port may follow) that is not a trusted proxy is the client's, for the failed-authentication limit and an agent's GeoIP location. From any other peer the header is ignored", secret: false },
    Var { name: "GATEWAY_MAX_WAITS_PER_KEY", services: "gateway", default: "16", doc: "live streams, reads of a check with `Prefer: wait` and action lookups with `wait_ms` that one API key holds open at once on one gateway (1-100000); one more stream is 429 `ERR_RATE_LIMITED`, one more read or lookup answers without waiting", secret: false },
    Var { name: "GATEWAY_MAX_CLAIMS_PER_AGENT", services: "gateway", default: "4", doc: "long-poll claims (`wait_ms` over 0) one agent holds open at once on one gateway (2-100000; the agent keeps two, its checks' and its HAProxy relay's); one more is 429 `ERR_RATE_LIMITED` with `Retry-After: 1`", secret: false },
    Var { name: "GATEWAY_AUTH_CACHE_TTL", services: "gateway", default: "5s", doc: "how long a verified agent token or operator key is trusted without asking PostgreSQL again (0s: always ask); a rotation or revocation on any replica is announced over Redis pub/sub and forgotten by every gateway at once, and a gateway that lost that subscription flushes its caches, so the TTL bounds only an announcement lost while the subscription seemed up", secret: false },
    Var { name: "GATEWAY_TLS_CERT_FILE", services: "gateway", default: "-", doc: "the gateway's certificate chain, leaf first (PEM): the gateway terminates TLS itself (with `GATEWAY_TLS_KEY_FILE`; both or neither). Read again when either file changes, without a restart; a pair that does not read keeps the previous one (logged, `checkplane_tls_reload_failures_total`)", secret: false },
    Var { name: "GATEWAY_TLS_KEY_FILE", services: "gateway", default: "-", doc: "the private key of `GATEWAY_TLS_CERT_FILE` (PEM: PKCS#8, PKCS#1 or SEC1)", secret: false },
    Var { name: "GATEWAY_TLS_RELOAD_INTERVAL", services: "gateway", default: "10s", doc: "how often the gateway looks whether its certificate or key file changed (100ms-1h)", secret: false },
];

/// Whether `name` is documented here, counting `<secret>_FILE` forms.
pub fn is_known(name: &str) -> bool {
    ALL.iter().any(|v| {
        v.name == name
            || (v.secret
                && name
                    .strip_suffix("_FILE")
                    .is_some_and(|base| base == v.name))
    })
}

/// The documented name nearest to a misspelt one, if any is close.
pub fn closest(name: &str) -> Option<&'static str> {
    ALL.iter()
        .map(|v| (strsim::levenshtein(name, v.name), v.name))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = ALL.iter().map(|v| v.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }

    #[test]
    fn file_forms_only_for_secrets() {
        assert!(is_known("METRICS_API_KEY_FILE"));
        assert!(!is_known("AGENT_HEALTH_ADDR_FILE"));
    }
}
