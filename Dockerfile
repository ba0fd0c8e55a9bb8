# syntax=docker/dockerfile:1
#
# docker build -t switchyard .
# docker run --rm -p 8080:8080 -v "$PWD/rules:/rules:ro" switchyard            # serve
# docker run --rm -v "$PWD/rules:/rules:ro" switchyard check                    # validate rules
#
# The admin listener (health, metrics, admin API) binds 0.0.0.0:9090 inside the container so that
# probes and Prometheus can reach it. It must stay private: never publish port 9090 to the public
# network or route a public load balancer to it.

# ---- build ----
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# .cargo/config.toml sets how the allocator (mimalloc) is built; the benches are named in
# Cargo.toml, so cargo wants their files even when it builds only the binary.
COPY .cargo ./.cargo
COPY src ./src
COPY benches ./benches
# Cache the registry and the target directory between builds (BuildKit); the binary is copied out
# of the cache mount so the next stage can see it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin switchyard \
    && install -m 0755 target/release/switchyard /usr/local/bin/switchyard

# ---- run ----
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 switchyard \
    && useradd --system --uid 10001 --gid switchyard --home-dir /data --shell /usr/sbin/nologin switchyard \
    && mkdir -p /rules /data \
    && chown switchyard:switchyard /data
COPY --from=build /usr/local/bin/switchyard /usr/local/bin/switchyard
# The example rules as a default; mount your own rule directory over /rules.
COPY rules /rules

# Every subcommand reads these (a flag on the command line still wins), so `serve`, `check` and
# `explain` all work on /rules without repeating flags.
ENV SWITCHYARD_RULES=/rules \
    SWITCHYARD_DATA_DIR=/data \
    SWITCHYARD_LISTEN=0.0.0.0:8080 \
    SWITCHYARD_ADMIN_LISTEN=0.0.0.0:9090

USER switchyard:switchyard
WORKDIR /data
VOLUME ["/rules", "/data"]
# 8080: callback ingress (public). 9090: admin API and metrics (private, see above).
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["switchyard"]
CMD ["serve"]
