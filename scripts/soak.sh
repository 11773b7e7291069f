#!/usr/bin/env bash
# Slow soak and fault tests (#[ignore]d in the normal suite), bounded in time and count.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(ulimit -l)" != unlimited ] && [ "$(ulimit -l)" -lt 4096 ]; then ulimit -l unlimited 2>/dev/null || true; fi
cargo nextest run --workspace --all-features --run-ignored only "$@"
