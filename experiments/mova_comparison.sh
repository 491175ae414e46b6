#!/usr/bin/env bash
# The MoVA comparison of docs/mova.md (issue 13 item 8), end to end, on one leg: LEG=synthetic (default: the
# embedded benchmark, by domain and format) or LEG=easy-vqa (the demo's questions).
# WORKERS=2 (default) runs two processes of one thread each (the faster way on the 2-core AMX machine):
#   worker A: the all-experts arm at seed 0 -- its training has no routing bits (every expert on), so its final
#      model also gives the routing data (train records) and, on the embedded benchmark, the routing labels (the
#      evaluated questions) -- then the routed arm (3 seeds; the random arm is evaluated on the routed arm's models:
#      same training settings);
#   worker B, meanwhile: single encoder and plain fusion, 3 seeds;
#   then the all-experts arm's seeds 1 and 2 side by side, and the whole table (every run reused), compare.png and
#   (embedded benchmark) routing accuracy against the labels.
# WORKERS=1 runs one process on every core, seed by seed (seed 0 of every arm first, the routing data after the
# all-experts arm): the faster way where two processes slow each other down (measured on a 2-core AMD EPYC
# machine without AMX: ~29 s a pretrain step alone on 2 threads, ~85-100 s each for two 1-thread processes).
# Finished runs are reused (compare_run.json) and an interrupted training resumes from its newest checkpoint (saved
# every 10 steps here; neither option is part of a run's keys), so an interrupted script continues where it stopped,
# losing at most 10 steps of each training in flight.
#   experiments/mova_comparison.sh                  # OUT=runs/mova-compare
#   LEG=easy-vqa experiments/mova_comparison.sh     # OUT=runs/mova-compare-easyvqa
#   SMOKE=1 experiments/mova_comparison.sh     # 1+1 steps, a few questions: the plumbing only (from a scratch folder:
#                                              # the routed presets read runs/mova-routing* relative to the cwd)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
LEG=${LEG:-synthetic}
case "$LEG" in
  synthetic)  # the routed presets read runs/mova-routing/{routed,routing_instructions}.json
    SINGLE=mova-compare-single CONCAT=mova-synthetic-concat ALL=mova-compare-all ROUTED=mova-compare-routed
    RANDOM_ARM=mova-compare-random ROUTING=runs/mova-routing TRAIN_DATA=synthetic:train.json
    OUT=${OUT:-runs/mova-compare} ;;
  easy-vqa)   # ... runs/mova-routing-easyvqa/
    SINGLE=mova-easyvqa-single CONCAT=mova-easyvqa-concat ALL=mova-easyvqa-all ROUTED=mova-easyvqa-routed
    RANDOM_ARM=mova-easyvqa-random ROUTING=runs/mova-routing-easyvqa TRAIN_DATA=easy-vqa:train_single.json
    OUT=${OUT:-runs/mova-compare-easyvqa} ;;
  *) echo "LEG must be synthetic or easy-vqa, not '$LEG'" >&2; exit 2 ;;
esac
LABELS=${LABELS:-$OUT/routing-labels}
VLWEAVE=${VLWEAVE:-vlweave}
PY=${PY:-python}
WORKERS=${WORKERS:-2}
[ "$WORKERS" = 1 ] || [ "$WORKERS" = 2 ] || { echo "WORKERS must be 1 or 2, not '$WORKERS'" >&2; exit 2; }
if [ "$WORKERS" = 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
else export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
SETS=(--set train.save_every=10 --set train.keep_checkpoints=2)
LIMIT=()
QLIMIT=50
if [ "${SMOKE:-0}" = 1 ]; then
  SETS+=(--set train.stages.0.max_steps=1 --set train.stages.1.max_steps=1 --set train.stages.0.batch_size=2
         --set train.stages.1.batch_size=2 --set eval.limit=1 --set eval.batch_size=9)
  LIMIT=(--limit 8)
  QLIMIT=1
fi
mkdir -p "$OUT"
log() { echo "[mova-comparison $LEG $(date +%T)] $*" >&2; }

MODEL="$OUT/$ALL-seed0/final"

routing_data() {
  log "routing data from $MODEL"
  $VLWEAVE mova routing-data "$MODEL" --data "$TRAIN_DATA" --output "$ROUTING" "${LIMIT[@]}"
  if [ "$LEG" = synthetic ]; then
    mkdir -p "$LABELS"
    $PY "$HERE/mova_routing_accuracy.py" labels --limit "$QLIMIT" --output "$LABELS"
    $VLWEAVE mova routing-data "$MODEL" --data "$LABELS/questions.json" --output "$LABELS"
  fi
}
table() {
  log "the table (every run reused)"
  $VLWEAVE compare "$SINGLE" "$CONCAT" "$ROUTED" "$ALL" "$RANDOM_ARM" --seeds 3 --output "$OUT" "${SETS[@]}"
  if [ "$LEG" = synthetic ]; then
    $PY "$HERE/mova_routing_accuracy.py" score --labels "$LABELS/routed.json" --limit "$QLIMIT" \
      --json "$OUT/routing-accuracy.json" "$OUT/$ROUTED"-seed{0,1,2}
  fi
}

if [ "$WORKERS" = 1 ]; then
  for seed in 0 1 2; do
    log "seed $seed: $ALL, $SINGLE, $CONCAT ($OUT/worker.log)"
    $VLWEAVE compare "$ALL" "$SINGLE" "$CONCAT" --seed-list "$seed" --output "$OUT" "${SETS[@]}" \
      >> "$OUT/worker.log" 2>&1
    if [ "$seed" = 0 ]; then routing_data >> "$OUT/worker.log" 2>&1; fi
    log "seed $seed: $ROUTED, $RANDOM_ARM"
    $VLWEAVE compare "$ROUTED" "$RANDOM_ARM" --seed-list "$seed" --output "$OUT" "${SETS[@]}" >> "$OUT/worker.log" 2>&1
  done
  table
  exit 0
fi

worker_a() {
  log "A: seed 0 of $ALL (also the routing-data model)"
  $VLWEAVE compare "$ALL" --seed-list 0 --output "$OUT" "${SETS[@]}"
  routing_data
  for seed in 0 1 2; do
    $VLWEAVE compare "$ROUTED" "$RANDOM_ARM" --seed-list "$seed" --output "$OUT" "${SETS[@]}"
  done
}
worker_b() {
  for seed in 0 1 2; do
    $VLWEAVE compare "$SINGLE" "$CONCAT" --seed-list "$seed" --output "$OUT" "${SETS[@]}"
  done
}
worker_a > "$OUT/worker-a.log" 2>&1 &
A=$!
worker_b > "$OUT/worker-b.log" 2>&1 &
B=$!
wait $A || { log "worker A failed: $OUT/worker-a.log"; exit 1; }
wait $B || { log "worker B failed: $OUT/worker-b.log"; exit 1; }
log "$ALL seeds 1 and 2, one per core"
$VLWEAVE compare "$ALL" --seed-list 1 --output "$OUT" "${SETS[@]}" > "$OUT/worker-a2.log" 2>&1 &
A=$!
$VLWEAVE compare "$ALL" --seed-list 2 --output "$OUT" "${SETS[@]}" > "$OUT/worker-b2.log" 2>&1 &
B=$!
wait $A || { log "$ALL seed 1 failed: $OUT/worker-a2.log"; exit 1; }
wait $B || { log "$ALL seed 2 failed: $OUT/worker-b2.log"; exit 1; }
table
