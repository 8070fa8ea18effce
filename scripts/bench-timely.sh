#!/usr/bin/env bash
# Throughput of the demo job on timely dataflow with 1, 2 and 4 workers in one process,
# without checkpoints and with about one checkpoint per second (the interval is set from
# the throughput measured without checkpoints in the same run), and the synchronous
# checkpoint pause per worker.
#
# Usage: scripts/bench-timely.sh [EVENTS]   (default 4000000)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rockstate-target}"
events="${1:-4000000}"
cargo build --release --locked -p rockstate-cli --bin rockstate >&2
bin="$CARGO_TARGET_DIR/release/rockstate"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

run() { # workers interval
    rm -rf "$work/ck"
    "$bin" demo --engine timely --threads "$1" --events "$events" --keys 100000 \
        --checkpoint-interval "$2" --checkpoint-dir "$work/ck" --local-dir "$work/local" --json 2>/dev/null | tail -n 1
}

printf '%-8s %-14s %14s %8s %12s %16s %16s\n' workers checkpoints events/s ratio completed "mean pause ms" "max pause ms"
for w in 1 2 4; do
    plain="$(run "$w" 0)"
    rate="$(python3 -c 'import json,sys; print(int(json.loads(sys.argv[1])["events_per_second"]))' "$plain")"
    printf '%-8s %-14s %14s %8s %12s %16s %16s\n' "$w" none "$rate" 1.00 - - -
    # One checkpoint per second at the rate just measured.
    checked="$(run "$w" "$rate")"
    python3 - "$checked" "$rate" "$w" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); base = float(sys.argv[2]); w = sys.argv[3]
print(f'{w:<8} {"every ~1 s":<14} {int(r["events_per_second"]):>14} {r["events_per_second"] / base:>8.2f} '
      f'{r["checkpoints_completed"]:>12} {r["mean_sync_pause_us"] / 1000:>16.1f} {r["max_sync_pause_us"] / 1000:>16.1f}')
PY
done
