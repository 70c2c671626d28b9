# Prometheus from Debian's package, for the compose file's `metrics` profile where the official
# prom/prometheus image cannot be pulled: `deploy/local-images.sh --metrics` builds it on the
# debootstrap base, and HYFHE_PROMETHEUS_IMAGE=hyfhe-prometheus:debian selects it. Same entry
# point and paths as the official image, so the compose service runs either.
ARG BASE=hyfhe-base:bookworm
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
