# One image for every role: the command picks it (coordinator | worker | serve | demo | run ...).
#
# With a registry (builds hyfhe from source in a Rust image):
#   docker build -t hyfhe .
#   docker run --rm hyfhe demo
# Without one, deploy/local-images.sh builds the `runtime` stage on a Debian base made with
# debootstrap and adds a binary built on the host (deploy/prebuilt.Dockerfile). Both base images
# are build arguments. The runtime stage comes first so that `--target runtime` builds nothing
# else, with or without BuildKit (the legacy builder builds every stage before its target).
ARG RUNTIME_IMAGE=debian:bookworm-slim
ARG BUILD_IMAGE=rust:1.91-bookworm

FROM ${RUNTIME_IMAGE} AS runtime
# curl is the healthchecks' client; a base that already has it (the debootstrap one) needs no
# package index, so the image builds offline.
RUN if ! command -v curl >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends curl ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --system --uid 10001 hyfhe
COPY config /etc/hyfhe
USER hyfhe
ENTRYPOINT ["hyfhe"]
CMD ["--help"]

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY config config
COPY benches benches
COPY loadtest loadtest
# The demo compiles the bundled digits model and data into the binary.
COPY tests/fixtures tests/fixtures
RUN cargo build --release --locked --bin hyfhe

FROM runtime
COPY --from=build /src/target/release/hyfhe /usr/local/bin/hyfhe
