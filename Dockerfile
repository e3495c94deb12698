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
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/tokenlease --create-home tokenlease
COPY --from=build /usr/local/bin/tokenlease /usr/local/bin/tokenlease
USER tokenlease
WORKDIR /var/lib/tokenlease
ENV TOKENLEASE_LISTEN=0.0.0.0:50051 \
    TOKENLEASE_DATA_DIR=/var/lib/tokenlease \
    TOKENLEASE_LOG_FORMAT=json \
    TOKENLEASE_METRICS__LISTEN=0.0.0.0:9464
EXPOSE 50051 9464
ENTRYPOINT ["tokenlease"]
CMD ["serve"]
