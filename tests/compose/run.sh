#!/usr/bin/env bash
# The docker-compose cluster, run for real: images built here without a registry
# (deploy/local-images.sh), `docker compose up`, the digits model served to `hyfhe run --mode
# remote` on the host (bit-identical to simulate), the same through the `tls` profile's nginx
# (HTTPS with a CA made here; a client without the CA refused), then container faults under open-loop load
# from hyfhe-loadtest, each checked bit for bit against simulate (tests/compose/analyse.py):
#
#   kill-worker     docker kill one worker mid-load (its leases taken over, nothing lost)
#   pause-worker    docker pause one past the lease TTL, then unpause (gives its shards up, rejoins)
#   partition       docker network disconnect one worker, reconnect it
#   restart-redis   docker compose restart redis (sessions renewed by clients, 503s meanwhile)
#   restart-coord   docker compose restart coordinator (clients retry with the same job ids)
#   scale-1-3-1     --scale worker=1, then 3, then 1 under load
#
# With --ha, the cluster is the `ha` profile instead (deploy/ha.env: Redis primary + replica under
# three sentinels, two coordinators behind HAProxy terminating TLS, outcomes announced after
# `WAIT 1`), the load goes over HTTPS through HAProxy, and the scenarios are:
#
#   kill-primary        docker kill the Redis primary (the sentinels promote the replica)
#   kill-sentinel       docker kill one of the three sentinels (the one clients ask first)
#   partition-replica   docker network disconnect the replica from its primary (and all), reconnect
#   kill-coordinator    docker kill one coordinator (HAProxy sends everything to the other)
#
# where every scenario also checks the tenant's bill: the jobs billed during it equal the module
# requests answered (nothing billed twice, nothing answered and lost from the bill).
#
# Prints a Markdown table (also written to target/compose-scenarios.md, or
# target/compose-ha-scenarios.md) and fails when any scenario lost, got wrong or failed a forward.
# Skipped, with the reason, where no Docker engine or Compose answers.
# Usage: tests/compose/run.sh [--ha] [SCENARIO...] (default: all of the mode's).
# Environment: HYFHE_COMPOSE_RATE (whole forwards/s, default 2), HYFHE_COMPOSE_LOAD_S (seconds of load
# per scenario, default 40), HYFHE_COMPOSE_KEEP=1 leaves the cluster up.
set -euo pipefail
cd "$(dirname "$0")/../.."
HA=0
if [ "${1:-}" = --ha ]; then
    HA=1
    shift
fi

skip() {
    echo "tests/compose: skipped: $*"
    exit 0
}
docker info >/dev/null 2>&1 || skip "no Docker engine answers (docker info failed)"
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    # Compose v1 applies deploy.replicas and deploy.resources.limits only in compatibility mode.
    COMPOSE=(docker-compose --compatibility)
else
    skip "neither 'docker compose' nor 'docker-compose' is installed"
fi

RATE=${HYFHE_COMPOSE_RATE:-2}
LOAD_S=${HYFHE_COMPOSE_LOAD_S:-40}
[[ "$RATE" =~ ^[1-9][0-9]*$ && "$LOAD_S" =~ ^[1-9][0-9]*$ ]] || {
    echo "HYFHE_COMPOSE_RATE and HYFHE_COMPOSE_LOAD_S are whole numbers (forwards/s, seconds)" >&2
    exit 2
}
SCENARIOS=("$@")
if [ ${#SCENARIOS[@]} -eq 0 ]; then
    if [ "$HA" = 1 ]; then
        SCENARIOS=(kill-primary kill-sentinel partition-replica kill-coordinator)
    else
        SCENARIOS=(kill-worker pause-worker partition restart-redis restart-coord scale-1-3-1)
    fi
fi
# config/docker.toml: queue.lease_ttl_ms (5 s) and worker.max_pending (2 jobs per worker).
LEASE_TTL_S=5
MAX_PENDING=2

log() { printf '[compose %s] %s\n' "$(date +%T)" "$*" >&2; }
now_ms() { date +%s%3N; }

cargo build --release --locked --quiet --workspace --bins
TARGET=${CARGO_TARGET_DIR:-target}
HYFHE=$TARGET/release/hyfhe
LOADTEST=$TARGET/release/hyfhe-loadtest
HYFHE_BINARY=$HYFHE deploy/local-images.sh

work=$(mktemp -d)
chmod 755 "$work" # the containers run as uid 10001 and read the models from here
project="hyfhe-ci-$$"
# The tls profile's proxy runs throughout (it only adds a way in), so teardown removes it too.
# The ha profile brings its own proxy (HAProxy, TLS too).
if [ "$HA" = 1 ]; then
    compose() { "${COMPOSE[@]}" -p "$project" --env-file deploy/ha.env --profile ha "$@"; }
else
    compose() { "${COMPOSE[@]}" -p "$project" --profile tls "$@"; }
fi
load=""
cleanup() {
    status=$?
    # A scenario that failed mid-fault: stop its load and undo a pause before tearing down.
    if [ -n "$load" ]; then
        kill "$load" 2>/dev/null || true
        wait "$load" 2>/dev/null || true
    fi
    for c in $(docker ps -q --filter "label=com.docker.compose.project=$project" --filter status=paused); do
        docker unpause "$c" >/dev/null 2>&1 || true
    done
    if [ "$status" -ne 0 ]; then
        for s in coordinator worker redis $([ "$HA" = 1 ] && echo redis-replica sentinel-1 lb); do
            log "last logs of $s:"
            compose logs --tail 30 "$s" 2>&1 | tail -60 >&2 || true
        done
    fi
    if [ "${HYFHE_COMPOSE_KEEP:-0}" = 1 ]; then
        log "left running: project $project (docker-compose -p $project down -v)"
    else
        compose down -v --timeout 5 >/dev/null 2>&1 || true
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT

log "compiling the digits CNN into $work/models"
$HYFHE compile --model tests/fixtures/digits_cnn.onnx \
    --remote features.2 --remote classifier.0 --remote classifier.2 \
    --calibration tests/fixtures/digits_calibration_images.npy \
    --out "$work/models/digits_cnn" --force >/dev/null
# A model compiled from a live torch model (the Python front), where its venv exists (.ci/run
# makes it in python/test.sh before this script): served by the same cluster.
PY=${HYFHE_PY_VENV:-$PWD/target/pyenv}/bin/python
if [ -x "$PY" ] && "$PY" -c "import hyfhe.torch" 2>/dev/null; then
    "$PY" tests/compose/torch_front.py compile "$work/models"
else
    PY=""
    log "no venv with the hyfhe wheel (${HYFHE_PY_VENV:-target/pyenv}): the torch-front check is skipped (bash python/test.sh makes it)"
fi
API_KEY="ci-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
KEY_HASH=$($HYFHE keys hash "$API_KEY")
printf '[[tenants]]\nname = "compose-ci"\napi_key_sha256 = "%s"\n' "$KEY_HASH" >"$work/tenants.toml"
chmod -R a+rX "$work" # whatever the umask: the containers run as uid 10001
export HYFHE_MODELS_PATH="$work/models" HYFHE_TENANTS_PATH="$work/tenants.toml"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# The compose network's fixed /24 (docker-compose.yml, HYFHE_NET_PREFIX): one no other Docker
# network on this host uses, so that this cluster runs beside another one.
if [ -z "${HYFHE_NET_PREFIX:-}" ]; then
    used=$(docker network inspect $(docker network ls -q) -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}' 2>/dev/null || true)
    for third in $(seq 232 254); do
        if ! grep -q "172\.30\.$third\." <<<"$used"; then
            HYFHE_NET_PREFIX=172.30.$third
            break
        fi
    done
    [ -n "${HYFHE_NET_PREFIX:-}" ] || {
        echo "no free 172.30.232-254.0/24 for the compose network: set HYFHE_NET_PREFIX" >&2
        exit 1
    }
fi
export HYFHE_NET_PREFIX
HYFHE_PORT=$(free_port)
export HYFHE_PORT
URL="http://127.0.0.1:$HYFHE_PORT"
# The tls profile: a CA and a certificate for localhost, made here (nginx reads them).
HYFHE_TLS_DIR="$work/tls" HYFHE_TLS_PORT=$(free_port)
export HYFHE_TLS_DIR HYFHE_TLS_PORT
mkdir -p "$HYFHE_TLS_DIR"
(
    cd "$HYFHE_TLS_DIR"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=hyfhe compose CI CA" \
        -keyout ca-key.pem -out ca.pem
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout key.pem -out cert.csr
    printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n' >cert.ext
    openssl x509 -req -in cert.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
        -extfile cert.ext -out cert.pem
) >"$work/openssl.log" 2>&1 || {
    cat "$work/openssl.log" >&2
    exit 1
}
chmod -R a+rX "$work"
TLS_URL="https://localhost:$HYFHE_TLS_PORT"
if [ "$HA" = 1 ]; then
    # Everything goes through HAProxy, over TLS, as an HA deployment's clients would.
    HYFHE_LB_PORT=$(free_port)
    export HYFHE_LB_PORT
    TLS_URL="https://localhost:$HYFHE_LB_PORT"
fi

containers() { docker ps -q --filter "label=com.docker.compose.project=$project" --filter "label=com.docker.compose.service=$1"; }
# Wait until the coordinator is ready and N workers report healthy (they hold shards).
wait_ready() {
    local want=$1 deadline=$((SECONDS + 180)) healthy
    while :; do
        healthy=0
        for c in $(containers worker); do
            [ "$(docker inspect -f '{{.State.Health.Status}}' "$c")" = healthy ] && healthy=$((healthy + 1))
        done
        if [ "$healthy" -eq "$want" ] && curl -fsS "$URL/health/ready" >/dev/null 2>&1 &&
            { [ "$HA" = 0 ] || ha_ready; }; then
            break
        fi
        [ $SECONDS -lt $deadline ] || {
            log "not ready after 180 s: $healthy of $want workers healthy"
            return 1
        }
        sleep 1
    done
    sleep $((LEASE_TTL_S / 2 + 1)) # let the shard leases settle over the workers
}
# --- the ha profile: who is primary, and is everything back ---------------------------------
sentinels() { for s in sentinel-1 sentinel-2 sentinel-3; do containers $s; done; }
# The Redis servers' fixed addresses (docker-compose.yml).
NET_PREFIX=${HYFHE_NET_PREFIX:-172.30.232}
address_of() { if [ "$1" = redis ]; then echo "$NET_PREFIX.10"; else echo "$NET_PREFIX.11"; fi; }
# The primary's service name (redis or redis-replica), from the address the first live
# sentinel names.
primary() {
    local s ip
    for s in $(sentinels); do
        ip=$(docker exec "$s" redis-cli -p 26379 SENTINEL get-master-addr-by-name hyfhe 2>/dev/null | head -1)
        case "$ip" in
        "$NET_PREFIX.10") echo redis && return ;;
        "$NET_PREFIX.11") echo redis-replica && return ;;
        esac
    done
}
replica_of() { if [ "$1" = redis ]; then echo redis-replica; else echo redis; fi; }
# Ready: every sentinel names the same primary and knows the two others, the primary says so
# (ROLE) and its replica is online, both coordinators are healthy and the proxy serves.
ha_ready() {
    local p s c info
    p=$(primary)
    [ -n "$p" ] && [ "$(sentinels | wc -l)" -eq 3 ] || return 1
    for s in $(sentinels); do
        info=$(docker exec "$s" redis-cli -p 26379 SENTINEL MASTER hyfhe 2>/dev/null) || return 1
        [ "$(echo "$info" | awk 'prev == "name" { print; exit } { prev = $0 }')" = hyfhe ] || return 1
        [ "$(echo "$info" | awk 'prev == "num-other-sentinels" { print; exit } { prev = $0 }')" = 2 ] || return 1
        [ "$(docker exec "$s" redis-cli -p 26379 SENTINEL get-master-addr-by-name hyfhe | head -1)" = "$(address_of "$p")" ] || return 1
    done
    c=$(containers "$p")
    [ -n "$c" ] && [ "$(docker exec "$c" redis-cli ROLE | head -1)" = master ] || return 1
    docker exec "$c" redis-cli INFO replication | grep -q 'state=online' || return 1
    for s in coordinator coordinator-2; do
        c=$(containers $s)
        [ -n "$c" ] && [ "$(docker inspect -f '{{.State.Health.Status}}' "$c")" = healthy ] || return 1
    done
    curl -fsS --cacert "$HYFHE_TLS_DIR/ca.pem" "$TLS_URL/health/ready" >/dev/null 2>&1
}
redis_container() {
    if [ "$HA" = 1 ]; then containers "$(primary)"; else containers redis; fi
}
duplicates() {
    docker exec "$(redis_container)" redis-cli GET hyfhe:stats:duplicate-outcomes | tr -dc 0-9 || true
}
# The tenant's billed jobs (cluster-wide, from the store) as a live coordinator reports them;
# fails, saying so, when none does (a coordinator that cannot read the bill leaves the series
# out, and a missing series must not read as 0).
billed_jobs() {
    local c n
    for c in $(containers coordinator) $(containers coordinator-2); do
        n=$(docker exec "$c" curl -fsS http://127.0.0.1:9100/metrics 2>/dev/null |
            awk '$1 == "hyfhe_tenant_jobs_total{tenant=\"compose-ci\"}" { printf "%d", $2 }') || true
        if [[ "$n" =~ ^[0-9]+$ ]]; then
            echo "$n"
            return
        fi
    done
    log "no coordinator reports the tenant's bill"
    return 1
}

# `hyfhe store audit` in a live coordinator (its env names the sentinels): the sessions'
# key-blob references after a fault, as a Markdown row; fails when a live session is missing
# from a reference set (what a failover must never leave). Run under load, so a session opened
# or closed between its reads could show as stale; a missing reference could not.
store_audit() {
    local c out=""
    for c in $(containers coordinator) $(containers coordinator-2); do
        # Exit 1 with JSON is a finding (judged below); without JSON, try the other one.
        out=$(docker exec "$c" hyfhe store audit --config /etc/hyfhe/docker.toml --json 2>&1) || true
        case "$out" in "{"*) break ;; esac
    done
    python3 - "$1" "$out" <<'PY'
import json, sys
name, text = sys.argv[1], sys.argv[2]
try:
    a = json.loads(text)
except ValueError:
    sys.exit(f"{name}: no store audit: {text}")
print(f"| {name} | {a['sessions']} | {a['key_blobs']} | {len(a['unreferenced_uses'])} | "
      f"{a['sessions_without_blob']} | {a['stale_references']} | {a['unreferenced_blobs']} | "
      f"{a['stale_quota_entries']} |")
if a["unreferenced_uses"]:
    sys.exit(f"{name}: live sessions missing from their blobs' references: {a['unreferenced_uses']}")
PY
}

log "docker compose up (project $project, coordinator on $URL)"
t=$SECONDS
compose up -d >/dev/null 2>&1 || compose up -d
wait_ready 3
log "cluster ready in $((SECONDS - t)) s: $(docker ps --filter "label=com.docker.compose.project=$project" --format '{{.Names}}' | sort | tr '\n' ' ')"

log "hyfhe run --mode remote through the cluster, compared with simulate"
$HYFHE run "$work/models/digits_cnn" --mode remote --compare simulate \
    --input tests/fixtures/digits_test_images.npy --first 16 \
    --labels tests/fixtures/digits_test_y.npy \
    --server "$URL" --api-key "$API_KEY" --json >"$work/demo.json"
python3 - "$work/demo.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["mode"] == "remote" and r["reference"]["mode"] == "simulate", r
if not r["reference"]["bit_identical"]:
    sys.exit(f"remote differs from simulate: max |diff| {r['reference']['max_abs_diff']}")
print(f"[compose] digits through the cluster: 16 images, accuracy {100 * r['accuracy']:.1f}%, "
      f"bit-identical to simulate, {r['stats']['requests']} requests, {r['total_ms']:.0f} ms", file=sys.stderr)
PY

log "the same through the $([ "$HA" = 1 ] && echo "ha profile's HAProxy" || echo "tls profile's nginx"): $TLS_URL"
until curl -fsS --cacert "$HYFHE_TLS_DIR/ca.pem" "$TLS_URL/health/live" >/dev/null 2>&1; do
    [ $SECONDS -lt $((t + 300)) ] || {
        log "the TLS proxy never answered"
        exit 1
    }
    sleep 1
done
HYFHE_CA_CERT="$HYFHE_TLS_DIR/ca.pem" $HYFHE run "$work/models/digits_cnn" --mode remote \
    --compare simulate --input tests/fixtures/digits_test_images.npy --first 4 \
    --server "$TLS_URL" --api-key "$API_KEY" --json >"$work/tls.json"
python3 - "$work/tls.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
if not r["reference"]["bit_identical"]:
    sys.exit(f"remote over the TLS proxy differs from simulate: max |diff| {r['reference']['max_abs_diff']}")
print(f"[compose] 4 images over HTTPS through the TLS proxy: bit-identical to simulate, {r['stats']['requests']} requests", file=sys.stderr)
PY
# Without the CA the client refuses the proxy's certificate, and says so.
if $HYFHE run "$work/models/digits_cnn" --mode remote --input tests/fixtures/digits_test_images.npy \
    --first 1 --server "$TLS_URL" --api-key "$API_KEY" >/dev/null 2>"$work/tls-untrusted.err"; then
    log "a client without the CA was served through the TLS proxy"
    exit 1
fi
grep -q "UnknownIssuer" "$work/tls-untrusted.err" || {
    log "the untrusted-certificate error does not say why:"
    cat "$work/tls-untrusted.err" >&2
    exit 1
}
log "a client without the CA: refused ($(grep -o 'invalid peer certificate[^)]*' "$work/tls-untrusted.err" | head -1))"

if [ -n "$PY" ]; then
    log "the torch-front model from a fresh Python process, remote through the cluster"
    HYFHE_API_KEY="$API_KEY" "$PY" tests/compose/torch_front.py remote "$work/models" "$URL"
fi

# --- fault scenarios ------------------------------------------------------------------------
table="$work/table.md"
{
    echo "| scenario | forwards | module requests | final errors | retried attempts (cause) | lost | wrong | duplicate evaluations | jobs billed | fault (s) | recovery (s) | p50 (ms) | max (s) |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
} >"$table"
failed=0
audits=()

# The worker to fault: the one receiving the most jobs over two seconds, so that the fault hits
# shards the load is using (4 sessions use at most 4 of the 16 shards: an arbitrary worker could
# hold none of them and the scenario would test nothing).
jobs_received() {
    local n
    n=$(docker exec "$1" curl -fsS http://127.0.0.1:9090/metrics 2>/dev/null |
        awk '$1 == "hyfhe_worker_jobs_received_total" { printf "%d", $2 }')
    echo "${n:-0}"
}
busiest_worker() {
    local c best="" most=-1 n
    declare -A before
    for c in $(containers worker); do before[$c]=$(jobs_received "$c"); done
    sleep 2
    for c in $(containers worker); do
        n=$(($(jobs_received "$c") - ${before[$c]:-0}))
        if [ "$n" -gt "$most" ]; then best=$c most=$n; fi
    done
    log "faulting worker $(docker inspect -f '{{.Name}}' "$best") ($most jobs in the last 2 s)"
    echo "$best"
}

# The faults: each runs while the load does and returns when the fault is over.
fault_kill-worker() { docker kill "$VICTIM" >/dev/null; }
fault_pause-worker() {
    local c=$VICTIM
    docker pause "$c" >/dev/null
    sleep $((2 * LEASE_TTL_S))
    docker unpause "$c" >/dev/null
}
fault_partition() {
    local c=$VICTIM net
    net=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "$c")
    docker network disconnect "$net" "$c"
    sleep $((2 * LEASE_TTL_S))
    docker network connect --alias worker "$net" "$c"
}
fault_restart-redis() { compose restart redis >/dev/null 2>&1; }
fault_restart-coord() { compose restart coordinator >/dev/null 2>&1; }
# The ha profile's faults. A failover's "fault" lasts until the sentinels name a new primary
# and it answers as one.
until_or_fail() {
    local what=$1 deadline=$((SECONDS + 60))
    shift
    until "$@"; do
        [ $SECONDS -lt $deadline ] || {
            log "$what: not within 60 s"
            return 1
        }
        sleep 0.2
    done
}
promoted() {
    local p
    p=$(primary)
    [ -n "$p" ] && [ "$p" != "$OLD_PRIMARY" ] &&
        [ "$(docker exec "$(containers "$p")" redis-cli ROLE 2>/dev/null | head -1)" = master ]
}
# The killed primary is started again once the sentinels have promoted its replica (what an
# orchestrator does), and the fault lasts until it is back as the new primary's replica:
# until then outcomes have no replica to wait for (each waits queue.replica_ack_timeout_ms).
fault_kill-primary() {
    local c
    OLD_PRIMARY=$(primary)
    c=$(docker ps -aq --filter "label=com.docker.compose.project=$project" \
        --filter "label=com.docker.compose.service=$OLD_PRIMARY")
    log "killing the Redis primary, $OLD_PRIMARY"
    docker kill "$c" >/dev/null
    until_or_fail "a new primary" promoted
    log "the sentinels promoted $(primary) after $((($(now_ms) - start) / 1000)) s; starting $OLD_PRIMARY again"
    docker start "$c" >/dev/null
    until_or_fail "$OLD_PRIMARY back as a replica" replica_linked "$OLD_PRIMARY"
}
fault_kill-sentinel() {
    # The first in every client's list: asked first on each reconnect until it fails.
    docker kill "$(containers sentinel-1)" >/dev/null
    sleep $((2 * LEASE_TTL_S))
}
replica_linked() {
    docker exec "$(containers "$1")" redis-cli INFO replication | grep -q '^master_link_status:up'
}
fault_partition-replica() {
    local r c net
    r=$(replica_of "$(primary)")
    c=$(containers "$r")
    net=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "$c")
    log "cutting the replica $r off its primary (and everything else)"
    docker network disconnect "$net" "$c"
    # Past the sentinels' down-after (3 s): the replica is seen down, replication stops.
    sleep $((2 * LEASE_TTL_S))
    docker network connect --ip "$(address_of "$r")" --alias "$r" "$net" "$c"
    until_or_fail "the replica's link back up" replica_linked "$r"
}
fault_kill-coordinator() {
    docker kill "$(containers coordinator-2)" >/dev/null
    sleep $((2 * LEASE_TTL_S))
}
fault_scale-1-3-1() {
    compose up -d --no-recreate --scale worker=1 >/dev/null 2>&1
    sleep 8
    compose up -d --no-recreate --scale worker=3 >/dev/null 2>&1
    sleep 10
    compose up -d --no-recreate --scale worker=1 >/dev/null 2>&1
}
# After each: the cluster back to three ready workers.
restore() {
    local c
    for c in $(docker ps -aq --filter "label=com.docker.compose.project=$project" --filter status=exited); do
        docker start "$c" >/dev/null
    done
    compose up -d --no-recreate --scale worker=3 >/dev/null 2>&1
    wait_ready 3
}
# Duplicate evaluations a fault can explain: the jobs the cut-off worker had in hand.
allowed_dups() {
    case "$1" in
    pause-worker | partition) echo "$MAX_PENDING" ;;
    # A failover can lose lease writes: two workers may briefly both read a shard.
    kill-primary) echo $((3 * MAX_PENDING)) ;;
    *) echo 0 ;;
    esac
}
LOAD_URL=$URL
[ "$HA" = 1 ] && LOAD_URL=$TLS_URL

for name in "${SCENARIOS[@]}"; do
    declare -F "fault_$name" >/dev/null || {
        echo "unknown scenario $name" >&2
        exit 2
    }
    load_s=$LOAD_S
    [ "$name" != scale-1-3-1 ] || load_s=$((LOAD_S + 20))
    log "$name: ${load_s} s of load at $RATE/s"
    dups_before=$(duplicates)
    billed_before=-
    [ "$HA" = 0 ] || billed_before=$(billed_jobs)
    events="$work/$name.events"
    rm -f "$events"
    HYFHE_CA_CERT="$HYFHE_TLS_DIR/ca.pem" $LOADTEST --server "$LOAD_URL" --api-key "$API_KEY" --model digits_cnn \
        --input tests/fixtures/digits_test_images.npy --rate "$RATE" --clients 4 \
        --duration-s "$load_s" --drain-s 180 --verify-with "$work/models/digits_cnn" \
        --events "$events" --json >"$work/$name.json" 2>"$work/$name.err" &
    load=$!
    # Fault once the load has run a few seconds (sessions are opened and warmed up first).
    until [ -f "$events" ] && [ "$(grep -c '"ok"' "$events" || true)" -ge $((RATE * 5)) ]; do
        kill -0 "$load" 2>/dev/null || break
        sleep 0.2
    done
    VICTIM=""
    case "$name" in kill-worker | pause-worker | partition) VICTIM=$(busiest_worker) ;; esac
    start=$(now_ms)
    "fault_$name"
    end=$(now_ms)
    log "$name: fault over after $(((end - start) / 1000)) s"
    # The store right after the fault, while the load's sessions are live (they close at its end).
    if [ "$HA" = 1 ]; then
        audit_row=$(store_audit "$name") || failed=1
        [ -z "$audit_row" ] || audits+=("$audit_row")
    fi
    if ! wait "$load"; then
        load=""
        log "$name: hyfhe-loadtest failed:"
        tail -20 "$work/$name.err" >&2
        exit 1
    fi
    load=""
    dups_after=$(duplicates)
    dups=$((${dups_after:-0} - ${dups_before:-0}))
    [ "$dups" -ge 0 ] || dups=${dups_after:-0} # Redis restarted: its counter began again
    # The bill is checked in the ha profile, where it survives faults; a lone Redis without
    # persistence (restart-redis) starts it again.
    billed=-
    if [ "$HA" = 1 ]; then
        billed_after=$(billed_jobs)
        billed=$((10#$billed_after - 10#$billed_before))
    fi
    row=$(python3 tests/compose/analyse.py "$name" "$work/$name.json" "$events" "$start" "$end" \
        "$dups" "$(allowed_dups "$name")" "$billed") || failed=1
    if [ -n "$row" ]; then
        echo "$row" >>"$table"
        echo "$row" >&2
    fi
    restore
done

if [ "$HA" = 1 ]; then
    {
        echo
        echo "Store audit at the end of each fault, under load (\`hyfhe store audit\`):"
        echo
        echo "| after | sessions | key blobs | sessions missing a reference | sessions without their blob | stale references | unreferenced blobs | stale quota entries |"
        echo "|---|---|---|---|---|---|---|---|"
        printf '%s\n' "${audits[@]}"
    } >>"$table"
fi

mkdir -p target
cp "$table" "target/compose-$([ "$HA" = 1 ] && echo ha-)scenarios.md"
cat "$table"
[ "$failed" = 0 ] || {
    log "some scenarios broke their promises (above)"
    exit 1
}
log "all scenarios: nothing lost, nothing wrong"
