#!/usr/bin/env bash
# The performance targets of the QUIC and perf issues (#4, #6), measured in one go on this
# machine: a fresh local 3-node cluster per run (`baton cluster up`, load started 10 s after
# it is up), removed after each run.
#
#   perf/targets.sh [REPS]          # REPS runs of each measurement (default 3)
#
# Environment: OVERLOAD_S (default 60; 0 skips the 2x overload run), TARGETS_DIR (keep the
# result files there instead of a temporary directory), BASE_PORT (default 7400).
#
# Measures, in this order:
#   inputs     fio's fdatasync and write latency (4 KiB, O_DIRECT, same filesystem), one WAL
#              append (`baton wal bench --record-bytes 128 --in-flight 1`), the status round trip
#              (`baton status --repeat 2000`, a QUIC request/response without consensus)
#   peak       closed loop, 4 connections x 4 in flight x 1,000-tx requests, 10 s
#   sequential one client, one transaction at a time to the leader, committed, 10 s
#   half       open loop at half the median peak, 250-tx requests to the leader, 15 s
#   overload   open loop at twice the median peak, 100-tx requests, OVERLOAD_S seconds: peak RSS
# and prints a Markdown table of medians against the targets (docs/performance.md, "Checking the
# targets"). A missing fio is installed when apt-get is there, else its rows are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
overload_s=${OVERLOAD_S:-60}
port=${BASE_PORT:-7400}
cargo build --release -q -p baton -p baton-perf
B=$PWD/target/release/baton
P=$PWD/target/release/baton-perf
if [ -n "${TARGETS_DIR:-}" ]; then
  out=$TARGETS_DIR
  mkdir -p "$out"
else
  out=$(mktemp -d -p "${TMPDIR:-/tmp}" baton-targets.XXXXXX)
fi
work=$(mktemp -d -p "${TMPDIR:-/tmp}" baton-targets-work.XXXXXX)
up_pid=
cleanup() {
  if [ -n "$up_pid" ]; then kill -TERM "$up_pid" 2>/dev/null || true; wait "$up_pid" 2>/dev/null || true; fi
  rm -rf "$work"
  [ -n "${TARGETS_DIR:-}" ] || rm -rf "$out"
}
trap cleanup EXIT
# glommio needs locked memory; the nodes inherit this limit.
ulimit -l unlimited 2>/dev/null || ulimit -l 65536 2>/dev/null || true

# Starts a cluster in $work/cluster, waits until a node answers and 10 s more (a fresh
# cluster's first seconds are its own start-up: docs/performance.md).
cluster_up() {
  rm -rf "$work/cluster"
  RUST_LOG=warn,openraft::core::heartbeat=error "$B" cluster up --dir "$work/cluster" --nodes 3 \
    --base-port "$port" >"$work/up.log" 2>&1 &
  up_pid=$!
  for _ in $(seq 300); do
    "$B" status --cluster "$work/cluster" >/dev/null 2>&1 && break
    sleep 0.1
  done
  sleep 10
}
cluster_down() {
  kill -TERM "$up_pid"
  wait "$up_pid" || true
  up_pid=
  rm -rf "$work/cluster"
}
# perf_run LABEL ARGS...: one baton-perf run on a fresh cluster, its JSON kept as LABEL.json.
# Exit 1 (some transactions failed, e.g. overload's expected client backlog) still wrote a
# result that the table judges; anything else (bad arguments, no cluster) stops the script.
perf_run() {
  local label=$1 rc=0
  shift
  cluster_up
  "$P" run --cluster "$work/cluster" --quiet --out "$out/$label.json" "$@" >"$out/$label.md" || rc=$?
  cluster_down
  if [ "$rc" -gt 1 ]; then
    echo "baton-perf run $label failed (exit $rc); cluster log:" >&2
    tail -20 "$work/up.log" >&2
    exit "$rc"
  fi
  echo "  $label done" >&2
}

echo "inputs…" >&2
if ! command -v fio >/dev/null && command -v apt-get >/dev/null; then
  { apt-get update -qq && apt-get install -y -qq fio; } >/dev/null 2>&1 || true
fi
for i in $(seq "$reps"); do
  if command -v fio >/dev/null; then
    fio --name=sync --filename="$work/fio.dat" --rw=write --bs=4k --size=32m --direct=1 \
      --fdatasync=1 --runtime=5 --time_based --output-format=json >"$out/fio-$i.json"
    rm -f "$work/fio.dat"
  fi
  "$B" wal bench --dir "$work/wal" --record-bytes 128 --in-flight 1 --seconds 3 --json >"$out/wal-$i.json"
  rm -rf "$work/wal"
done
cluster_up
"$B" status --cluster "$work/cluster" --repeat 2000 --json >"$out/round-trip.json" 2>/dev/null
cluster_down

echo "peak…" >&2
for i in $(seq "$reps"); do
  perf_run "peak-$i" --connections 4 --in-flight 4 --batch 1000 --warmup-s 3 --duration-s 10
done
peak=$(python3 -c '
import json, statistics, sys
print(round(statistics.median(json.load(open(f))["throughput"]["tx_per_s"] for f in sys.argv[1:])))
' "$out"/peak-*.json)

echo "sequential…" >&2
for i in $(seq "$reps"); do
  perf_run "sequential-$i" --spread leader --connections 1 --in-flight 1 --batch 1 --warmup-s 2 --duration-s 10
done

echo "half the peak ($((peak / 2)) tx/s)…" >&2
for i in $(seq "$reps"); do
  perf_run "half-$i" --rate $((peak / 2)) --batch 250 --spread leader --warmup-s 2 --duration-s 15
done

if [ "$overload_s" -gt 0 ]; then
  echo "2x overload ($((peak * 2)) tx/s offered, ${overload_s} s)…" >&2
  perf_run overload --rate $((peak * 2)) --batch 100 --warmup-s 1 --duration-s "$overload_s"
fi

python3 - "$out" "$reps" <<'PY'
import glob, json, os, statistics, sys

out, reps = sys.argv[1], int(sys.argv[2])
load = lambda p: json.load(open(p))
med = statistics.median

def runs(label):
    return [load(f"{out}/{label}-{i}.json") for i in range(1, reps + 1)]

def ack(r):
    return r["latency_ms"]["committed"]

fios = [load(p)["jobs"][0] for p in sorted(glob.glob(f"{out}/fio-*.json"))]
sync_us = med(j["sync"]["lat_ns"]["percentile"]["50.000000"] / 1e3 for j in fios) if fios else None
write_us = med(j["write"]["clat_ns"]["percentile"]["50.000000"] / 1e3 for j in fios) if fios else None
wal_us = med(load(p)["latency_us"]["p50"] for p in sorted(glob.glob(f"{out}/wal-*.json")))
rt_us = med(n["round_trip"]["p50_us"] for n in load(f"{out}/round-trip.json") if "round_trip" in n)

peaks = [r["throughput"]["tx_per_s"] for r in runs("peak")]
seq = [ack(r)["p50"] for r in runs("sequential")]
half = runs("half")
half_p99 = [ack(r)["p99"] for r in half]

def fmt(xs, unit, digits=2):
    return " / ".join(f"{x:.{digits}f}" for x in xs) + f" {unit} (median {med(xs):.{digits}f})"

def verdict(ok):
    return "**met**" if ok else "**missed**"

print("| target | measured | verdict |")
print("|---|---|---|")
print(f"| sustained throughput >= 300,000 tx/s (closed loop 4 x 4 x 1,000) | "
      f"{' / '.join(f'{p / 1e3:.0f}k' for p in peaks)} tx/s (median {med(peaks) / 1e3:.0f}k) | "
      f"{verdict(med(peaks) >= 300_000)} |")
print(f"| sequential committed p50 <= 1 ms | {fmt(seq, 'ms')} | {verdict(med(seq) <= 1.0)} |")
if sync_us is not None:
    for name, disk_us in (("fdatasync alone", sync_us), ("write + fdatasync", sync_us + write_us)):
        bound = 3 * (disk_us + rt_us) / 1e3
        print(f"| sequential p50 <= 3 x (fio {name} {disk_us:.0f} us + round trip {rt_us:.0f} us)"
              f" = {bound:.2f} ms | {med(seq):.2f} ms ({med(seq) / bound:.2f}x) | "
              f"{verdict(med(seq) <= bound)} |")
print(f"| p99 <= 5 ms at half the peak ({half[0]['config']['rate_tx_per_s'] / 1e3:.0f}k tx/s, "
      f"250-tx requests to the leader) | {fmt(half_p99, 'ms', 1)} | {verdict(med(half_p99) <= 5.0)} |")
over = f"{out}/overload.json"
if os.path.exists(over):
    o = load(over)
    rss = [n.get("rss_max_bytes") or 0 for n in o["nodes"]]
    errors = o["errors"]["by_type"]
    silent = set(errors) - {"unsent (client backlog)", "overloaded"}
    print(f"| 2x overload ({o['config']['rate_tx_per_s'] / 1e3:.0f}k offered): every node's RSS "
          f"< 1 GiB, back-pressure only | peak RSS {' / '.join(f'{r >> 20}' for r in rss)} MiB, "
          f"{o['throughput']['tx_per_s'] / 1e3:.0f}k tx/s through, errors: "
          f"{', '.join(sorted(errors)) or 'none'} | {verdict(max(rss) < 1 << 30 and not silent)} |")
print()
print(f"Inputs (medians): WAL single 128-byte append {wal_us:.0f} us, status round trip "
      f"{rt_us:.0f} us" + (f", fio fdatasync {sync_us:.0f} us, fio 4 KiB O_DIRECT write "
      f"{write_us:.0f} us" if sync_us is not None else ", fio not run") + ".")
print(f"Half the peak, the leader's stages (p50 / p99 ms):")
for r in half:
    lead = next((n for n in r["nodes"] if n["role"] == "leader"), None)
    if lead and lead.get("stages"):
        st = {s["stage"]: s for s in lead["stages"]["stages"]}
        print("  " + ", ".join(f"{k} {st[k]['p50_us'] / 1e3:.2f} / {st[k]['p99_us'] / 1e3:.2f}"
                               for k in ("total", "commit", "wal", "replicate", "apply") if k in st))
PY
