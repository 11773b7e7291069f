#!/usr/bin/env bash
# WAL vs fio on the same filesystem, same write size per fdatasync, same run.
#
#   bench/fio-compare.sh [DIR] [SECONDS] [REPS]
#
# Each case runs REPS times (default 3), alternating WAL and fio so that drift of the disk hits
# both alike; the table shows the medians and the ratio of the medians.
# For each case the WAL appends rounds of IN_FLIGHT records of RECORD bytes. depth 1: it waits
# for each round's group commit before the next (closed loop, one fdatasync per RECORD*IN_FLIGHT
# bytes, exactly fio's pattern). depth 2: it appends the next round while the previous one syncs
# (a busy log; bytes per sync is printed, it stays close to RECORD*IN_FLIGHT). fio writes blocks of
# RECORD*IN_FLIGHT bytes with O_DIRECT and an fdatasync after every write:
#   fio --name=wal --filename=DIR/fio.dat --rw=write --bs=BS --size=1G --direct=1 --fdatasync=1 \
#       --ioengine=psync --runtime=SECONDS --time_based
# fio rewrites its 1 GiB file over and over (it wraps in well under a second for large blocks):
# it writes into blocks that are already written. The WAL runs twice per repetition: "steady"
# purges behind itself (--keep-segments 2, as a node does after snapshots), so its new segments
# are recycled files, the same situation; "fresh" never purges, so it writes new segments (from
# zero-filled spares while the background writer keeps up, else preallocated ones).
# fio also runs on fresh blocks ("fio_new": a file large enough that it never wraps, as a new
# segment is), the fair reference for "fresh": its ratio is fresh / fio_new.
# Prints the throughputs and the ratios (target: WAL >= 80% of fio).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-}
secs=${2:-5}
reps=${3:-3}
# Bigger than anything fio writes in SECONDS at the disk's speed (it is fallocated, not written).
fresh_size=${FIO_FRESH_SIZE:-16G}
if [ -z "$dir" ]; then dir=$(mktemp -d -p . bench-fio.XXXXXX); trap 'rm -rf "$dir"' EXIT; fi
mkdir -p "$dir"
if ! command -v fio >/dev/null; then
  echo "installing fio (Debian package)…" >&2
  { apt-get update -qq && apt-get install -y -qq fio; } >/dev/null
fi
cargo build --release -q -p baton
printf '%-24s %11s %11s %11s %11s %7s %7s %12s %12s %14s\n' 'record x round, depth' steady_MiB/s fresh_MiB/s fio_MiB/s fio_new_MiB/s ratio fresh wal_syncs/s fio_syncs/s wal_KiB/sync
for case in "4096 1 1" "65536 1 1" "4096 64 1" "4096 64 2" "65536 64 1" "65536 64 2" "1048576 8 1" "1048576 8 2"; do
  read -r rb inf depth <<<"$case"
  bs=$((rb * inf))
  wals=(); fresh=(); fios=(); fionew=()
  for _ in $(seq "$reps"); do
    rm -rf "$dir/wal"
    wals+=("$(./target/release/baton wal bench --dir "$dir/wal" --record-bytes "$rb" --in-flight "$inf" --depth "$depth" --seconds "$secs" --keep-segments 2 --json)")
    rm -rf "$dir/wal"
    fresh+=("$(./target/release/baton wal bench --dir "$dir/wal" --record-bytes "$rb" --in-flight "$inf" --depth "$depth" --seconds "$secs" --json)")
    fios+=("$(fio --name=wal --filename="$dir/fio.dat" --rw=write --bs="$bs" --size=1G --direct=1 --fdatasync=1 \
          --ioengine=psync --runtime="$secs" --time_based --output-format=json)")
    rm -f "$dir/fio.dat"
    fionew+=("$(fio --name=wal --filename="$dir/fio.dat" --rw=write --bs="$bs" --size="$fresh_size" --direct=1 --fdatasync=1 \
          --ioengine=psync --runtime="$secs" --time_based --output-format=json)")
    rm -f "$dir/fio.dat"
  done
  python3 - "$rb" "$inf" "$depth" "${#wals[@]}" "${wals[@]}" "${fresh[@]}" "${fios[@]}" "${fionew[@]}" <<'PY'
import json, statistics, sys
rb, inf, depth, n = (int(a) for a in sys.argv[1:5])
wals = [json.loads(x) for x in sys.argv[5:5 + n]]
fresh = [json.loads(x) for x in sys.argv[5 + n:5 + 2 * n]]
fios = [json.loads(x)["jobs"][0]["write"] for x in sys.argv[5 + 2 * n:5 + 3 * n]]
fionew = [json.loads(x)["jobs"][0]["write"] for x in sys.argv[5 + 3 * n:5 + 4 * n]]
w = statistics.median(x["bytes_per_s"] for x in wals) / 2**20
wf = statistics.median(x["bytes_per_s"] for x in fresh) / 2**20
f = statistics.median(x["bw_bytes"] for x in fios) / 2**20
fn = statistics.median(x["bw_bytes"] for x in fionew) / 2**20
ws = statistics.median(x["syncs"] / x["seconds"] for x in wals)
fs = statistics.median(x["total_ios"] / (x["runtime"] / 1000) for x in fios)
kps = statistics.median(x["bytes_per_sync"] for x in wals) / 1024
print(f"{rb}B x{inf}, depth {depth}".ljust(24), f"{w:11.1f} {wf:11.1f} {f:11.1f} {fn:11.1f} {w / f:7.2f} {wf / fn:7.2f} {ws:12.0f} {fs:12.0f} {kps:14.0f}")
PY
done
