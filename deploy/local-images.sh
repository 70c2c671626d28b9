#!/usr/bin/env bash
# Build every image docker-compose.yml needs without a container registry:
#
#   hyfhe-base:bookworm   Debian bookworm made with debootstrap and `docker import`: the runtime's
#                         needs (ca-certificates, curl), redis-server, nginx and haproxy.
#   redis:7-bookworm      that base under the tag the compose file's redis service names (Debian
#                         bookworm ships Redis 7.0).
#   nginx:bookworm        the same base under the tag of the `tls` profile's proxy (nginx 1.22).
#   haproxy:2.6-bookworm  the same base under the tag of the `ha` profile's load balancer
#                         (HAProxy 2.6).
#   hyfhe:latest          the Dockerfile's `runtime` stage on that base plus a hyfhe binary built
#                         here on the host (deploy/prebuilt.Dockerfile; build on Debian bookworm
#                         or an older glibc: the binary must run on bookworm's).
#
# Idempotent: the base is rebuilt only when its recipe changes (a label on the image records it)
# and the hyfhe image reuses Docker's layer cache, so a second run takes seconds.
#
#   deploy/local-images.sh            # then: docker compose up -d
#   deploy/local-images.sh --rebase   # rebuild the base even if its recipe is unchanged
#   deploy/local-images.sh --metrics  # also hyfhe-prometheus:debian (Debian's Prometheus) for the
#                                     # metrics profile: HYFHE_PROMETHEUS_IMAGE=hyfhe-prometheus:debian
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), HYFHE_IMAGE_CACHE (where the
# root filesystem is assembled; default ~/.cache/hyfhe-images), HYFHE_BINARY (use this binary
# instead of building one). Needs root (or sudo) for debootstrap, and installs Debian's
# debootstrap package when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=ca-certificates,curl,redis-server,nginx-light,haproxy
BASE=hyfhe-base:$SUITE
CACHE=${HYFHE_IMAGE_CACHE:-$HOME/.cache/hyfhe-images}
rebase=0
metrics=0
for arg in "$@"; do
    case "$arg" in
    --rebase) rebase=1 ;;
    --metrics) metrics=1 ;;
    -h | --help)
        sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "unknown option $arg (see --help)" >&2
        exit 2
        ;;
    esac
done

log() { printf '[local-images] %s\n' "$*" >&2; }
# docker build, quiet unless it fails (the legacy builder's deprecation notice is noise: BuildKit
# is off on purpose, see the Dockerfile, and may not even be installed).
build() {
    local out
    out=$(DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0} docker build --quiet "$@" 2>&1) || {
        printf '%s\n' "$out" >&2
        return 1
    }
}
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
docker info >/dev/null 2>&1 || {
    echo "no Docker engine answers (docker info failed)" >&2
    exit 1
}

# --- the Debian base -------------------------------------------------------------------------
recipe=$(printf '%s|%s|%s|v1' "$SUITE" "$MIRROR" "$PACKAGES" | sha256sum | cut -c1-16)
have=$(docker image inspect --format '{{ index .Config.Labels "org.hyfhe.recipe" }}' "$BASE" 2>/dev/null || true)
if [ "$rebase" = 1 ] || [ "$have" != "$recipe" ]; then
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing Debian's debootstrap"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap >/dev/null
    fi
    rootfs="$CACHE/rootfs-$SUITE-$recipe"
    $SUDO rm -rf "$rootfs"
    mkdir -p "$CACHE"
    log "debootstrap $SUITE ($PACKAGES) from $MIRROR (a few minutes)"
    $SUDO debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
        >"$CACHE/debootstrap.log" 2>&1 || {
        tail -20 "$CACHE/debootstrap.log" >&2
        exit 1
    }
    # What an image does not need: package lists, caches, docs. The Debian package's redis
    # service files are for systemd; the container runs redis-server directly.
    $SUDO rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
    log "importing $BASE"
    $SUDO tar -C "$rootfs" --numeric-owner -c . | docker import \
        --change "LABEL org.hyfhe.recipe=$recipe" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        - "$BASE" >/dev/null
    $SUDO rm -rf "$rootfs"
else
    log "$BASE is up to date (recipe $recipe)"
fi
docker tag "$BASE" redis:7-bookworm
docker tag "$BASE" nginx:bookworm
docker tag "$BASE" haproxy:2.6-bookworm

# --- the hyfhe image -------------------------------------------------------------------------
binary=${HYFHE_BINARY:-}
if [ -z "$binary" ]; then
    log "building the hyfhe binary (cargo build --release --bin hyfhe)"
    cargo build --release --locked --quiet --bin hyfhe
    binary=${CARGO_TARGET_DIR:-target}/release/hyfhe
fi
mkdir -p "$CACHE"
context=$(mktemp -d "$CACHE/context.XXXXXX")
trap 'rm -rf "$context"' EXIT
cp -p "$binary" "$context/hyfhe"
cp -rp config "$context/config"
log "building hyfhe:latest (the Dockerfile's runtime stage on $BASE, plus $binary)"
build --target runtime --build-arg RUNTIME_IMAGE="$BASE" -f Dockerfile \
    -t "hyfhe-runtime:$SUITE" "$context"
build --build-arg RUNTIME="hyfhe-runtime:$SUITE" -f deploy/prebuilt.Dockerfile -t hyfhe:latest \
    "$context"
docker run --rm --entrypoint hyfhe hyfhe:latest --version >/dev/null || {
    echo "$binary does not run in $BASE (built against a newer glibc than bookworm's?)" >&2
    exit 1
}

# --- Prometheus for the metrics profile (optional: its package is fetched inside the build) -----
if [ "$metrics" = 1 ]; then
    log "building hyfhe-prometheus:debian (Debian's prometheus package on $BASE)"
    build --build-arg BASE="$BASE" -t hyfhe-prometheus:debian - <deploy/prometheus.Dockerfile
fi
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' \
    | grep -E '^(hyfhe|hyfhe-base|hyfhe-runtime|hyfhe-prometheus|redis|nginx|haproxy):' >&2
