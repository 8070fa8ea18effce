#!/usr/bin/env bash
# The guided tour behind `make demo`: run the demo job, kill it with SIGKILL mid-run, watch
# its status turn stale, find its latest checkpoint, verify and inspect it, resume at
# another parallelism, take a savepoint of the running job from another process, stop it
# with a final savepoint, resume from each savepoint at other parallelisms, and compare
# the final state digests with an uninterrupted run of the same stream.
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
# Bold headings on a terminal only (not in logs, not with NO_COLOR or TERM=dumb).
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ] && [ "${TERM:-}" != "dumb" ]; then
  step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
  step() { printf '\n== %s\n' "$*"; }
fi
digest() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["state_digest"])'; }
field() { python3 -c "import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])[\"$1\"])"; }
# Checkpoints completed by the live writer of job $1, from its status (0 while the status
# is missing or stale: the new run has not written its own yet).
live_checkpoints() {
  { "$rs" status "$1" --json 2>/dev/null || true; } | python3 -c '
import json, sys
lines = sys.stdin.read().strip().splitlines()
doc = json.loads(lines[-1]) if lines else {}
status = doc.get("status") or {}
print(0 if doc.get("stale", True) else status.get("completed", 0))'
}
# Waits until the job of process $3 has completed $2 checkpoints of its own, or ended.
wait_for_checkpoints() {
  local job=$1 want=$2 pid=$3
  local n
  while kill -0 "$pid" 2>/dev/null; do
    n=$(live_checkpoints "$job")
    [[ "$n" =~ ^[0-9]+$ ]] || n=0
    [ "$n" -ge "$want" ] && break
    sleep 0.1
  done
}

rm -rf "$DIR"
mkdir -p "$DIR"
common=(--checkpoint-dir "$DIR/checkpoints" --events "$EVENTS" --keys 20000 --seed 7
  --checkpoint-interval 50000 --json)
# The runs that are interrupted read a live source (records arrive at --rate), so that
# there is a running job to act on; the others run as fast as they can.
live=(--rate 100000 --status-interval 1s)

step "1. Run the job at parallelism 2 and kill it with SIGKILL after 3 checkpoints"
"$rs" demo "${common[@]}" "${live[@]}" --job-id tour --parallelism 2 --local-dir "$DIR/local" \
  >"$DIR/run1.json" 2>"$DIR/run1.log" &
pid=$!
wait_for_checkpoints "$JOB" 3 "$pid"
kill -9 "$pid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true
cat "$DIR/run1.log"
echo "(killed with SIGKILL)"

step "2. Its status turns stale (nobody refreshes it), and its latest completed checkpoint"
for _ in $(seq 120); do
  if ! "$rs" status "$JOB" >"$DIR/status.txt"; then break; fi
  sleep 0.5
done
head -6 "$DIR/status.txt"
"$rs" checkpoints "$JOB"
latest=$("$rs" latest "$JOB")
echo "latest: $latest"

step "3. Verify every file of it (size and CRC32), and inspect it"
"$rs" verify "$latest"
"$rs" inspect "$latest" | head -20 || true

step "4. Resume at parallelism 3; from another shell: status, a savepoint of the running job, and a stop with a final savepoint"
"$rs" demo "${common[@]}" "${live[@]}" --job-id tour --resume --parallelism 3 \
  --local-dir "$DIR/local" --savepoint-dir "$DIR/savepoints" >"$DIR/run2.json" 2>"$DIR/run2.log" &
pid=$!
wait_for_checkpoints "$JOB" 2 "$pid"
"$rs" status "$JOB" | head -8 || true
live_savepoint=$("$rs" savepoint trigger "$JOB" --wait 2m || true)
echo "savepoint of the running job: ${live_savepoint:-none (see the line above)}"
final_savepoint=$("$rs" stop "$JOB" --savepoint "$DIR/savepoints" --wait 2m || true)
echo "final savepoint: ${final_savepoint:-none (see the line above)}"
wait "$pid" || true
cat "$DIR/run2.log"

step "5. Resume from the final savepoint as a new job at parallelism 1, to the end of the stream"
if [ -z "$final_savepoint" ]; then
  # The job had already finished: continue from its latest checkpoint instead.
  from=$("$rs" latest "$JOB")
else
  "$rs" inspect "$final_savepoint" | head -8 || true
  from=$final_savepoint
fi
"$rs" demo "${common[@]}" --job-id tour-rescaled --from "$from" --parallelism 1 \
  --local-dir "$DIR/local" >"$DIR/run3.json" 2>"$DIR/run3.log"
tail -n 3 "$DIR/run3.log"
resumed=$(digest <"$DIR/run3.json")

from_live=$resumed
if [ -n "$live_savepoint" ]; then
  step "6. The savepoint taken while the job ran restores too, at parallelism 4"
  "$rs" demo "${common[@]}" --job-id tour-live --from "$live_savepoint" --parallelism 4 \
    --local-dir "$DIR/local" >"$DIR/run4.json" 2>"$DIR/run4.log"
  tail -n 3 "$DIR/run4.log"
  from_live=$(digest <"$DIR/run4.json")
fi

step "7. The same stream without interruption, at parallelism 2"
"$rs" demo "${common[@]}" --job-id reference --parallelism 2 --local-dir "$DIR/local" \
  >"$DIR/reference.json" 2>"$DIR/reference.log"
reference=$(digest <"$DIR/reference.json")

echo
echo "state digest after kill, resume at 3, stop, resume at 1: $resumed"
echo "state digest from the live savepoint, resumed at 4:      $from_live"
echo "state digest of the uninterrupted run:                   $reference"
if [ "$resumed" != "$reference" ] || [ "$from_live" != "$reference" ]; then
  echo "MISMATCH: an interrupted job does not end in the same state" >&2
  exit 1
fi
echo "equal: every event counted exactly once across the crash, the rescales and the savepoints"
