# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run in a slim Debian image as a
# non-root user. No protoc is needed (build.rs compiles the protos with protox) and
# TLS uses rustls, so the runtime image needs only CA certificates. BuildKit cache
# mounts keep the registry and target folder between builds.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tokenlease \
    && cp target/release/tokenlease /usr/local/bin/tokenlease

FROM debian:bookworm-slim
# The data folder (embedded mode: the SQLite configuration, the generated master key
# and the first admin key) is its own directory, 0700 and owned by the service user,
# and a volume: a named volume starts as a copy of it, owner and mode included, and
# keeps the data across container replacements. The service also makes each file in
# it 0600 at every start, whatever the folder's mode.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/tokenlease --create-home tokenlease \
    && install -d -m 0700 -o tokenlease -g tokenlease /var/lib/tokenlease/data
COPY --from=build /usr/local/bin/tokenlease /usr/local/bin/tokenlease
USER tokenlease
WORKDIR /var/lib/tokenlease
# Listening: a container's loopback cannot be reached from outside it, so the image
# listens on every interface (0.0.0.0), in plaintext unless TLS is configured, and the
# server then warns at start ("listening beyond this host without TLS"). AcquireLease
# answers carry decrypted upstream tokens: either serve TLS, mounting a certificate and
# setting TOKENLEASE_TLS__CERT_PATH and TOKENLEASE_TLS__KEY_PATH (and
# TOKENLEASE_TLS__CLIENT_CA_PATH for mutual TLS), or publish the port only to a
# TLS-terminating proxy or to the host's loopback (docker run -p 127.0.0.1:50051:50051).
#
# The first admin key: in embedded mode (no DATABASE_URL) it is written to
# /var/lib/tokenlease/data/admin.key on first start:
#   docker exec <container> cat /var/lib/tokenlease/data/admin.key
# With Postgres (DATABASE_URL), create it against the same database:
#   docker exec <container> tokenlease create-api-key --name ops
ENV TOKENLEASE_LISTEN=0.0.0.0:50051 \
    TOKENLEASE_DATA_DIR=/var/lib/tokenlease/data \
    TOKENLEASE_LOG_FORMAT=json \
    TOKENLEASE_METRICS__LISTEN=0.0.0.0:9464
VOLUME ["/var/lib/tokenlease/data"]
EXPOSE 50051 9464
ENTRYPOINT ["tokenlease"]
CMD ["serve"]
