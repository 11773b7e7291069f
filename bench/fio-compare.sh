#!/usr/bin/env bash
# WAL vs fio on the same filesystem, same write size per fdatasync, same run.
#
#   bench/fio-compare.sh [DIR] [SECONDS] [REPS]
#
# Each case runs REPS times (default 3), alternating WAL and fio so that drift of the disk hits
# both alike; the table shows the medians and the ratio of the medians.
# For each case the WAL appends IN_FLIGHT records of RECORD bytes and waits for one group commit
# (so each fdatasync covers RECORD*IN_FLIGHT bytes); fio writes blocks of that same size with
# O_DIRECT and an fdatasync after every write:
#   fio --name=wal --filename=DIR/fio.dat --rw=write --bs=BS --size=1G --direct=1 --fdatasync=1 \
#       --ioengine=psync --runtime=SECONDS --time_based
# Prints both throughputs and the ratio (target: WAL >= 80% of fio).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-}
secs=${2:-5}
reps=${3:-3}
if [ -z "$dir" ]; then dir=$(mktemp -d -p . bench-fio.XXXXXX); trap 'rm -rf "$dir"' EXIT; fi
mkdir -p "$dir"
if ! command -v fio >/dev/null; then
  echo "installing fio (Debian package)…" >&2
  { apt-get update -qq && apt-get install -y -qq fio; } >/dev/null
fi
cargo build --release -q -p baton
printf '%-22s %14s %14s %8s %12s %12s\n' case wal_MiB/s fio_MiB/s ratio wal_syncs/s fio_syncs/s
for case in "4096 1" "65536 1" "4096 64" "65536 64" "1048576 8"; do
  read -r rb inf <<<"$case"
  bs=$((rb * inf))
  wals=(); fios=()
  for _ in $(seq "$reps"); do
    rm -rf "$dir/wal"
    wals+=("$(./target/release/baton wal bench --dir "$dir/wal" --record-bytes "$rb" --in-flight "$inf" --seconds "$secs" --json)")
    fios+=("$(fio --name=wal --filename="$dir/fio.dat" --rw=write --bs="$bs" --size=1G --direct=1 --fdatasync=1 \
          --ioengine=psync --runtime="$secs" --time_based --output-format=json)")
    rm -f "$dir/fio.dat"
  done
  python3 - "$rb" "$inf" "${#wals[@]}" "${wals[@]}" "${fios[@]}" <<'PY'
import json, statistics, sys
rb, inf, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
wals = [json.loads(x) for x in sys.argv[4:4 + n]]
fios = [json.loads(x)["jobs"][0]["write"] for x in sys.argv[4 + n:4 + 2 * n]]
w = statistics.median(x["bytes_per_s"] for x in wals) / 2**20
f = statistics.median(x["bw_bytes"] for x in fios) / 2**20
ws = statistics.median(x["fdatasyncs"] / x["seconds"] for x in wals)
fs = statistics.median(x["total_ios"] / (x["runtime"] / 1000) for x in fios)
print(f"{rb}B x{inf:<14} {w:14.1f} {f:14.1f} {w / f:8.2f} {ws:12.0f} {fs:12.0f}")
PY
done
