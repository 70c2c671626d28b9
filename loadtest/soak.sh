#!/usr/bin/env bash
# Soak test against a running hyfhe server: open-loop load at a fixed rate for a long time
# (hyfhe-loadtest --rate), sampling each interval the interval's latency and the resident memory
# (VmRSS) of the server's processes, then a markdown table of both (RSS growing minute after
# minute at a steady load is a leak; p99 growing is a backlog).
#
# Usage:
#   loadtest/soak.sh [options] [-- extra hyfhe-loadtest options]
#   CAPACITY=2.5 MODEL=digits_cnn INPUT=tests/fixtures/digits_test_images.npy \
#       HYFHE_API_KEY=hyfhe-demo-key loadtest/soak.sh
#
# Options (each also read from the environment variable in brackets; defaults after "="):
#   --server URL        [SERVER=http://127.0.0.1:8080] coordinator URL
#   --api-key KEY       [HYFHE_API_KEY, or API_KEY] tenant API key (required)
#   --model NAME        [MODEL] served model name (required)
#   --input FILE        [INPUT] input samples, .npy (required)
#   --capacity R        [CAPACITY] forwards/s the server sustains (e.g. a closed-loop run's
#                       forwards_per_s); the rate defaults to 80 % of it
#   --rate R            [RATE=0.8*CAPACITY] forwards/s offered (one of --rate, --capacity needed)
#   --duration-s S      [DURATION_S=600] send window
#   --interval-s S      [INTERVAL_S=30] sample interval
#   --clients N         [CLIENTS=4] sessions the forwards are spread over
#   --pids "P1 P2"      [PIDS] processes whose RSS to sample; otherwise those matching
#   --pgrep PATTERN     [PGREP=^hyfhe$] a pgrep pattern (process names; the default matches
#                       `hyfhe serve|coordinator|worker` but not hyfhe-loadtest)
#   --out-dir DIR       [OUT_DIR=a new /tmp/hyfhe-soak.XXXXXX] where samples.jsonl (the
#                       loadtest's interval samples), rss.tsv, report.json (its final report),
#                       loadtest.log (its stderr) and table.md go
#   --loadtest BIN      [LOADTEST=target/release/hyfhe-loadtest, else hyfhe-loadtest on PATH]
# Anything else (or after --) is passed to hyfhe-loadtest, e.g. --max-outstanding 64.
# Needs only bash, coreutils, awk, sed and pgrep (procps). Linux only (/proc).
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "soak.sh: $*" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
server=${SERVER:-http://127.0.0.1:8080}
api_key=${HYFHE_API_KEY:-${API_KEY:-}}
model=${MODEL:-}
input=${INPUT:-}
capacity=${CAPACITY:-}
rate=${RATE:-}
duration_s=${DURATION_S:-600}
interval_s=${INTERVAL_S:-30}
clients=${CLIENTS:-4}
pids=${PIDS:-}
pattern=${PGREP:-^hyfhe$}
out=${OUT_DIR:-}
loadtest=${LOADTEST:-}
extra=()
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --server|--api-key|--model|--input|--capacity|--rate|--duration-s|--interval-s|--clients|--pids|--pgrep|--out-dir|--loadtest)
            [ $# -ge 2 ] || die "$1 needs a value"
            case $1 in
                --server) server=$2 ;;
                --api-key) api_key=$2 ;;
                --model) model=$2 ;;
                --input) input=$2 ;;
                --capacity) capacity=$2 ;;
                --rate) rate=$2 ;;
                --duration-s) duration_s=$2 ;;
                --interval-s) interval_s=$2 ;;
                --clients) clients=$2 ;;
                --pids) pids=$2 ;;
                --pgrep) pattern=$2 ;;
                --out-dir) out=$2 ;;
                --loadtest) loadtest=$2 ;;
            esac
            shift 2 ;;
        --) shift; extra+=("$@"); break ;;
        *) extra+=("$1"); shift ;;
    esac
done

[ -n "$api_key" ] || die "no API key: set HYFHE_API_KEY (or --api-key)"
[ -n "$model" ] || die "no model: set MODEL (or --model)"
[ -n "$input" ] || die "no input: set INPUT (or --input) to a .npy file"
[ -f "$input" ] || die "input $input: no such file"
is_number() { [[ $1 =~ ^[0-9]+([.][0-9]*)?$|^[.][0-9]+$ ]]; }
if [ -z "$rate" ]; then
    [ -n "$capacity" ] || die "set RATE, or CAPACITY (the rate is then 80 % of it)"
    is_number "$capacity" || die "CAPACITY=$capacity is not a number"
    rate=$(awk -v c="$capacity" 'BEGIN { printf "%.6g", 0.8 * c }')
fi
is_number "$rate" || die "RATE=$rate is not a number"
is_number "$duration_s" || die "DURATION_S=$duration_s is not a number"
is_number "$interval_s" || die "INTERVAL_S=$interval_s is not a number"
if [ -z "$loadtest" ]; then
    if [ -x "$root/target/release/hyfhe-loadtest" ]; then
        loadtest=$root/target/release/hyfhe-loadtest
    else
        loadtest=$(command -v hyfhe-loadtest) ||
            die "no hyfhe-loadtest: cargo build --release -p hyfhe-loadtest, or set LOADTEST"
    fi
fi
if [ -z "$out" ]; then
    out=$(mktemp -d /tmp/hyfhe-soak.XXXXXX)
else
    mkdir -p "$out"
fi

# The processes to watch, resolved once (a restarted process shows as "-" from then on).
if [ -z "$pids" ]; then
    pids=$(pgrep -- "$pattern" | grep -vx -e "$$" -e "$BASHPID" | tr '\n' ' ' || true)
    [ -n "$pids" ] || echo "soak.sh: no process matches pgrep '$pattern': no RSS columns" >&2
fi
read -r -a watched <<<"$pids"
for pid in "${watched[@]}"; do
    [ -r "/proc/$pid/status" ] || die "no process $pid"
done
label() { # "hyfhe serve 1234": program and first argument
    local cmdline parts=()
    cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || true
    read -r -a parts <<<"$cmdline"
    local prog=${parts[0]:-?}
    echo "${prog##*/}${parts[1]:+ ${parts[1]}} $1"
}
labels=()
for pid in "${watched[@]}"; do labels+=("$(label "$pid")"); done
rss_row() { # one tab-separated row: the VmRSS of each watched process in KiB, "-" if gone
    local row=$1 pid kib
    for pid in "${watched[@]}"; do
        kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
        row+=$'\t'${kib:--}
    done
    echo "$row"
}

samples=$out/samples.jsonl
rss=$out/rss.tsv
: >"$samples"
rss_row start >"$rss"

lt=
cleanup() {
    if [ -n "$lt" ] && kill -0 "$lt" 2>/dev/null; then
        kill "$lt" 2>/dev/null || true
        wait "$lt" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "soak.sh: $rate forwards/s for $duration_s s against $server (model $model), samples every" \
    "$interval_s s, watching ${#watched[@]} processes; files in $out" >&2
HYFHE_API_KEY=$api_key "$loadtest" --server "$server" --model "$model" --input "$input" \
    --rate "$rate" --duration-s "${duration_s%.*}" --clients "$clients" \
    --report-every-s "$interval_s" --samples "$samples" --json "${extra[@]}" \
    >"$out/report.json" 2>"$out/loadtest.log" &
lt=$!

# An RSS row for every sample line, taken when that line appears (polled each second).
seen=0
catch_up() {
    local n
    n=$(wc -l <"$samples")
    while [ "$seen" -lt "$n" ]; do
        seen=$((seen + 1))
        rss_row "$seen" >>"$rss"
    done
}
while kill -0 "$lt" 2>/dev/null; do
    catch_up
    sleep 1
done
rc=0
wait "$lt" || rc=$?
lt=
catch_up
if [ "$rc" -ne 0 ]; then
    echo "soak.sh: hyfhe-loadtest failed (exit $rc); its stderr:" >&2
    tail -n 20 "$out/loadtest.log" >&2
fi

# JSON fields by name: the loadtest writes flat objects with unique keys (numbers, one map).
field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" <<<"$2"; }
codes() { sed -n 's/.*"errors_by_code":{\([^}]*\)}.*/\1/p' <<<"$1" | tr -d '"' | sed 's/,/, /g'; }
mib() { awk -v k="$1" 'BEGIN { if (k == "-" || k == "") print "-"; else printf "%.1f", k / 1024 }'; }
{
    header="| minute | p99 ms | ok | errors |"
    rule="|---:|---:|---:|---|"
    for l in "${labels[@]}"; do
        header+=" RSS MiB $l |"
        rule+="---:|"
    done
    echo "$header"
    echo "$rule"
    mapfile -t rss_rows <"$rss"
    start=()
    IFS=$'\t' read -r -a start <<<"${rss_rows[0]}"
    line="| start | - | - | - |"
    for ((j = 1; j <= ${#watched[@]}; j++)); do line+=" $(mib "${start[j]}") |"; done
    echo "$line"
    i=0
    last=("${start[@]}")
    while IFS= read -r sample; do
        i=$((i + 1))
        minute=$(awk -v t="$(field t_s "$sample")" -v i="$interval_s" \
            'BEGIN { printf (i >= 6 ? "%.1f" : "%.2f"), t / 60 }')
        p99=$(awk -v v="$(field latency_ms_p99 "$sample")" 'BEGIN { printf "%.1f", v }')
        errors=$(field errors "$sample")
        by_code=$(codes "$sample")
        line="| $minute | $p99 | $(field ok "$sample") | $errors${by_code:+ ($by_code)} |"
        row=()
        IFS=$'\t' read -r -a row <<<"${rss_rows[i]:-}"
        for ((j = 1; j <= ${#watched[@]}; j++)); do line+=" $(mib "${row[j]:-}") |"; done
        echo "$line"
        if [ ${#row[@]} -gt 0 ]; then last=("${row[@]}"); fi
    done <"$samples"
    if [ ${#watched[@]} -gt 0 ]; then
        line="| change | | | |"
        for ((j = 1; j <= ${#watched[@]}; j++)); do
            line+=" $(awk -v a="${start[j]}" -v b="${last[j]:-}" \
                'BEGIN { if (a == "-" || b == "-" || b == "") print "-"; else printf "%+.1f", (b - a) / 1024 }') |"
        done
        echo "$line"
    fi
    report=$(cat "$out/report.json")
    if [ -n "$report" ]; then
        echo
        printf 'target %s/s, achieved %s/s; sent %s of %s due, ok %s, errors %s%s, unfinished %s\n' \
            "$(field target_rate "$report")" "$(field achieved_rate "$report")" \
            "$(field sent "$report")" "$(field due "$report")" "$(field ok "$report")" \
            "$(field errors "$report")" "$(by=$(codes "$report"); echo "${by:+ ($by)}")" \
            "$(field unfinished "$report")"
        printf 'latency ms over the whole run: p50 %s, p90 %s, p99 %s, p99.9 %s, max %s\n' \
            "$(field latency_ms_p50 "$report")" "$(field latency_ms_p90 "$report")" \
            "$(field latency_ms_p99 "$report")" "$(field latency_ms_p99_9 "$report")" \
            "$(field latency_ms_max "$report")"
    fi
} | tee "$out/table.md"
exit "$rc"
