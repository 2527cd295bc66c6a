# Multi-stage build of every checkplane binary, and a Debian HAProxy image for compose.
#   docker build --target runtime -t checkplane .
#   docker build --target haproxy -t checkplane-haproxy .

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
    && mkdir -p /out \
    && cp target/release/gateway target/release/scheduler target/release/agent \
          target/release/haproxy-sync /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin checkplane
COPY --from=build /out/ /usr/local/bin/
COPY infra/docker/healthcheck /usr/local/bin/checkplane-healthcheck
USER checkplane
# `<service> healthcheck` of whichever service the container runs, DEGRADED counted healthy
# (infra/docker/healthcheck); compose's healthchecks run the same.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/checkplane-healthcheck"]
# Each compose service names its binary as the command.
CMD ["gateway"]

FROM debian:bookworm-slim AS haproxy
RUN apt-get update \
    && apt-get install -y --no-install-recommends haproxy curl \
    && rm -rf /var/lib/apt/lists/*
COPY infra/haproxy/haproxy.cfg /etc/haproxy/haproxy.cfg
CMD ["haproxy", "-W", "-db", "-S", "/run/haproxy-master.sock,level,admin", "-f", "/etc/haproxy/haproxy.cfg"]
