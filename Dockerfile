# syntax=docker/dockerfile:1.7
# The one Portcullis image: `portcullis run` (the sidecar) and `portcullis inject-webhook`.
# Build:  docker build -t portcullis:dev .
# The runtime stage has no shell and no package manager; it runs as UID 65532 and works with
# a read-only root filesystem (nothing is written outside mounted volumes).

ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
ARG RUST_VERSION
# Use the image's toolchain as it is: rust-toolchain.toml would otherwise ask rustup for the
# rustfmt and clippy components, which a release build does not need.
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION} \
    CARGO_TERM_COLOR=never
WORKDIR /src
# jemalloc (the process allocator, crates/memory) is built by its configure script and make;
# the slim image has a C compiler but no make. Pinned to bookworm's version (hadolint DL3008).
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
COPY . .
# The caches keep dependency builds across image builds; the binary is copied out of the
# cached target directory because cache mounts are not part of the layer. The execution
# profile optimizes the request path (PGO: benches/pgo/run.sh makes it; benches/common.sh
# passes the same flag to the benchmarks' builds).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    RUSTFLAGS="-Cprofile-use=/src/crates/portcullis/pgo.profdata" \
    cargo build --profile dist --locked -p portcullis --bin portcullis \
    && install -D -m 0755 target/dist/portcullis /out/portcullis

# glibc + libgcc, CA certificates, /etc/passwd with the nonroot user; no shell.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="portcullis" \
      org.opencontainers.image.description="Zero Trust sidecar for AI workloads: SPIFFE mTLS and Cedar policies in front of model endpoints, MCP servers and internal APIs" \
      org.opencontainers.image.source="https://github.com/portcullis-dev/portcullis" \
      org.opencontainers.image.url="https://github.com/portcullis-dev/portcullis" \
      org.opencontainers.image.documentation="https://github.com/portcullis-dev/portcullis/blob/main/docs/kubernetes.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Portcullis" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build /out/portcullis /usr/local/bin/portcullis
USER 65532:65532
# 8443: mTLS listener (sidecar) or HTTPS (webhook); 9901: admin (/metrics, /healthz, /readyz).
EXPOSE 8443 9901
ENTRYPOINT ["portcullis"]
CMD ["run", "--config", "/etc/portcullis/config.yaml"]
