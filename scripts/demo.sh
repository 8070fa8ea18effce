#!/usr/bin/env bash
# The guided tour behind `make demo`: run the demo job, kill it with SIGKILL mid-run, find
# its latest checkpoint, verify and inspect it, resume at another parallelism, stop with a
# savepoint, resume from the savepoint at a third parallelism, and compare the final state
# digest with an uninterrupted run of the same stream.
#
# Everything goes under ./rockstate-demo (removed first). Usage: scripts/demo.sh [EVENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rockstate-target}"
EVENTS="${1:-1000000}"
DIR=./rockstate-demo
JOB="$DIR/checkpoints/tour"

cargo build --locked --release -p rockstate-cli --bin rockstate
rs="$CARGO_TARGET_DIR/release/rockstate"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
digest() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["state_digest"])'; }
field() { python3 -c "import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])[\"$1\"])"; }
# Waits until the log shows $2 completed checkpoints (or the job has ended).
wait_for_checkpoints() {
  local log=$1 want=$2 pid=$3
  while kill -0 "$pid" 2>/dev/null && [ "$(grep -c ' completed' "$log" || true)" -lt "$want" ]; do
    sleep 0.05
  done
}

rm -rf "$DIR"
mkdir -p "$DIR"
common=(--checkpoint-dir "$DIR/checkpoints" --events "$EVENTS" --keys 20000 --seed 7
  --checkpoint-interval 50000 --json)

step "1. Run the job at parallelism 2 and kill it with SIGKILL after 3 checkpoints"
"$rs" demo "${common[@]}" --job-id tour --parallelism 2 --local-dir "$DIR/local" \
  >"$DIR/run1.json" 2>"$DIR/run1.log" &
pid=$!
wait_for_checkpoints "$DIR/run1.log" 3 "$pid"
kill -9 "$pid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true
cat "$DIR/run1.log"
echo "(killed with SIGKILL)"

step "2. Its checkpoints, and the latest completed one"
"$rs" checkpoints "$JOB"
latest=$("$rs" latest "$JOB")
echo "latest: $latest"

step "3. Verify every file of it (size and CRC32), and inspect it"
"$rs" verify "$latest"
"$rs" inspect "$latest" | head -20 || true

step "4. Resume at parallelism 3; stop it with SIGTERM after 2 more checkpoints, taking a savepoint"
"$rs" demo "${common[@]}" --job-id tour --resume --parallelism 3 --local-dir "$DIR/local" \
  --savepoint-dir "$DIR/savepoints" >"$DIR/run2.json" 2>"$DIR/run2.log" &
pid=$!
wait_for_checkpoints "$DIR/run2.log" 2 "$pid"
kill -TERM "$pid" 2>/dev/null || true
wait "$pid" || true
cat "$DIR/run2.log"
savepoint=$(field savepoint <"$DIR/run2.json")
echo "savepoint: $savepoint"

step "5. Resume from the savepoint as a new job at parallelism 1, to the end of the stream"
if [ "$savepoint" = "None" ]; then
  # The job had already finished: continue from its latest checkpoint instead.
  from=$("$rs" latest "$JOB")
else
  "$rs" inspect "$savepoint" | head -8 || true
  from=$savepoint
fi
"$rs" demo "${common[@]}" --job-id tour-rescaled --from "$from" --parallelism 1 \
  --local-dir "$DIR/local" >"$DIR/run3.json" 2>"$DIR/run3.log"
tail -n 3 "$DIR/run3.log"
resumed=$(digest <"$DIR/run3.json")

step "6. The same stream without interruption, at parallelism 2"
"$rs" demo "${common[@]}" --job-id reference --parallelism 2 --local-dir "$DIR/local" \
  >"$DIR/reference.json" 2>"$DIR/reference.log"
reference=$(digest <"$DIR/reference.json")

echo
echo "state digest after kill, resume at 3, savepoint, resume at 1: $resumed"
echo "state digest of the uninterrupted run:                        $reference"
if [ "$resumed" != "$reference" ]; then
  echo "MISMATCH: the interrupted job does not end in the same state" >&2
  exit 1
fi
echo "equal: every event counted exactly once across the crash, the rescales and the savepoint"
