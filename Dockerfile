# One image for every role: the command picks it (coordinator | worker | serve | demo | run ...).
#   docker build -t hyfhe .
#   docker run --rm hyfhe demo

FROM rust:1.91-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY config config
COPY benches benches
COPY loadtest loadtest
# The demo compiles the bundled digits model and data into the binary.
COPY tests/fixtures tests/fixtures
RUN cargo build --release --locked --bin hyfhe

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 hyfhe
COPY --from=build /src/target/release/hyfhe /usr/local/bin/hyfhe
COPY config /etc/hyfhe
USER hyfhe
ENTRYPOINT ["hyfhe"]
CMD ["--help"]
