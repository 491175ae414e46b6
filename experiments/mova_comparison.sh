#!/usr/bin/env bash
# The MoVA comparison of docs/mova.md (issue 13 item 8), end to end, as two processes (one per core):
#   worker A: mova-compare-all at seed 0 -- its training is mova-synthetic's (no routing bits: every expert on), so
#      its final model also gives the routing data (train records) and the routing labels (the evaluated
#      questions) -- then the routed arm (3 seeds; the random arm is evaluated on the routed arm's models: same
#      training settings);
#   worker B, meanwhile: single encoder and plain fusion, 3 seeds;
#   then mova-compare-all seeds 1 and 2 side by side, and the whole table (every run reused), compare.png and
#   routing accuracy against the labels.
# Finished runs are reused (compare_run.json) and an interrupted training resumes from its newest checkpoint (saved
# every 10 steps here; neither option is part of a run's keys), so an interrupted script continues where it stopped,
# losing at most 10 steps of each training in flight.
#   OUT=runs/mova-compare experiments/mova_comparison.sh
#   SMOKE=1 experiments/mova_comparison.sh     # 1+1 steps, a few questions: the plumbing only (from a scratch folder:
#                                              # the routed presets read runs/mova-routing relative to the cwd)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-runs/mova-compare}
ROUTING=${ROUTING:-runs/mova-routing}    # the routed presets read runs/mova-routing/{routed,routing_instructions}.json
LABELS=${LABELS:-$OUT/routing-labels}
VLWEAVE=${VLWEAVE:-vlweave}
PY=${PY:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SETS=(--set train.save_every=10 --set train.keep_checkpoints=2)
LIMIT=()
QLIMIT=50
if [ "${SMOKE:-0}" = 1 ]; then
  SETS+=(--set train.stages.0.max_steps=1 --set train.stages.1.max_steps=1 --set train.stages.0.batch_size=2
        --set train.stages.1.batch_size=2 --set eval.limit=1 --set eval.batch_size=9)
  LIMIT=(--limit 8)
  QLIMIT=1
fi
mkdir -p "$OUT" "$LABELS"
log() { echo "[mova-comparison $(date +%T)] $*" >&2; }

MODEL="$OUT/mova-compare-all-seed0/final"

worker_a() {
  log "A: seed 0 of mova-compare-all (also the routing-data model)"
  $VLWEAVE compare mova-compare-all --seed-list 0 --output "$OUT" "${SETS[@]}"
  log "A: routing data from $MODEL"
  $VLWEAVE mova routing-data "$MODEL" --data synthetic:train.json --output "$ROUTING" "${LIMIT[@]}"
  $PY "$HERE/mova_routing_accuracy.py" labels --limit "$QLIMIT" --output "$LABELS"
  $VLWEAVE mova routing-data "$MODEL" --data "$LABELS/questions.json" --output "$LABELS"
  for seed in 0 1 2; do
    $VLWEAVE compare mova-compare-routed mova-compare-random --seed-list "$seed" --output "$OUT" "${SETS[@]}"
  done
}
worker_b() {
  for seed in 0 1 2; do
    $VLWEAVE compare mova-compare-single mova-synthetic-concat --seed-list "$seed" --output "$OUT" "${SETS[@]}"
  done
}
worker_a > "$OUT/worker-a.log" 2>&1 &
A=$!
worker_b > "$OUT/worker-b.log" 2>&1 &
B=$!
wait $A || { log "worker A failed: $OUT/worker-a.log"; exit 1; }
wait $B || { log "worker B failed: $OUT/worker-b.log"; exit 1; }
log "mova-compare-all seeds 1 and 2, one per core"
$VLWEAVE compare mova-compare-all --seed-list 1 --output "$OUT" "${SETS[@]}" > "$OUT/worker-a2.log" 2>&1 &
A=$!
$VLWEAVE compare mova-compare-all --seed-list 2 --output "$OUT" "${SETS[@]}" > "$OUT/worker-b2.log" 2>&1 &
B=$!
wait $A || { log "mova-compare-all seed 1 failed: $OUT/worker-a2.log"; exit 1; }
wait $B || { log "mova-compare-all seed 2 failed: $OUT/worker-b2.log"; exit 1; }

log "the table (every run reused)"
$VLWEAVE compare mova-compare-single mova-synthetic-concat mova-compare-routed mova-compare-all mova-compare-random \
  --seeds 3 --output "$OUT" "${SETS[@]}"
$PY "$HERE/mova_routing_accuracy.py" score --labels "$LABELS/routed.json" --limit "$QLIMIT" \
  --json "$OUT/routing-accuracy.json" "$OUT"/mova-compare-routed-seed{0,1,2}
