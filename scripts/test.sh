#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this). Installs what it needs on a
# fresh machine. Slow soak/fault tests are #[ignore]d: run them with scripts/soak.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

# glommio (io_uring) needs at least 512 KiB of locked memory per executor.
if [ "$(ulimit -l)" != unlimited ] && [ "$(ulimit -l)" -lt 4096 ]; then
  ulimit -l unlimited 2>/dev/null || ulimit -l 65536 2>/dev/null ||
    echo "warning: ulimit -l is $(ulimit -l) KiB; glommio may fail to start" >&2
fi
# The disk-full test loop-mounts a small ext4 image (runs as root; says SKIPPED otherwise).
if ! command -v mkfs.ext4 >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && apt-get install -y -qq e2fsprogs; } >/dev/null || true
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi

# A clean clone builds everything once: incremental compilation only adds work then.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
cargo test --workspace --all-features --doc -q
# Last, so its summary line closes the run.
cargo nextest run --workspace --all-features "$@"
