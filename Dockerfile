# syntax=docker/dockerfile:1
# Multi-stage build of the operator image: a pinned Rust toolchain builds the locked dependency
# graph; the runtime is distroless (glibc, CA certificates, no shell, no package manager) and runs
# as the nonroot user.
#
#   docker build -t REGISTRY/wgtwo-operator:TAG .
#
# Without a registry (as in this repo's tests, tools/image/build.sh), the bases come in as build
# arguments: RUNTIME_IMAGE, an image with what distroless cc-debian12 holds; BINARY=prebuilt takes
# target/release/wgtwo-operator, built by `cargo build --release --locked` on a Debian 12 host
# (same glibc), instead of compiling in the builder stage. The runtime stage is the same either way.
ARG BUILD_IMAGE=docker.io/library/rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
# build: compile in the builder stage; prebuilt: the binary from the build context.
ARG BINARY=build

FROM ${BUILD_IMAGE} AS build
# make: jemalloc (the operator's allocator) is built from source by tikv-jemalloc-sys.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so a source-only change reuses the cached layer.
COPY Cargo.toml Cargo.lock ./
COPY tools/testenv/Cargo.toml tools/testenv/Cargo.toml
RUN mkdir -p src tools/testenv/src/bin \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > tools/testenv/src/bin/wgtwo-demo.rs && touch tools/testenv/src/lib.rs \
    && cargo build --release --locked --bin wgtwo-operator \
    && rm -rf src
COPY src src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin wgtwo-operator \
    && install -D -m 0755 target/release/wgtwo-operator /out/wgtwo-operator

# Builders that skip stages the result does not use (BuildKit, buildah, podman) never read this
# stage on the default path. The legacy builder (DOCKER_BUILDKIT=0) and kaniko without
# --skip-unused-stages build every stage, so there this COPY needs the file: use BuildKit.
FROM scratch AS prebuilt
ARG PREBUILT_BINARY=target/release/wgtwo-operator
COPY ${PREBUILT_BINARY} /out/wgtwo-operator

# hadolint ignore=DL3006
FROM ${BINARY} AS binary

FROM ${RUNTIME_IMAGE}
COPY --from=binary /out/wgtwo-operator /usr/local/bin/wgtwo-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/wgtwo-operator"]
CMD ["run"]
