#!/usr/bin/env bash
# Train two adapters on two bundled tasks, merge them (TIES, linear, task arithmetic) and evaluate
# every adapter on both tasks. Run from the repository root:
#
#     bash examples/merge_two_tasks/run.sh                          # 100 steps per adapter, 50 eval examples
#     STEPS=12 BATCH=2 LIMIT=12 bash examples/merge_two_tasks/run.sh   # a quick pass on a busy CPU
#
# Results: runs/merge-two-tasks/eval-<task>.json and the tables printed by `tuneforge eval`.
set -euo pipefail

STEPS="${STEPS:-100}"
LIMIT="${LIMIT:-50}"
BATCH="${BATCH:-4}"
HERE="examples/merge_two_tasks"
RUNS="runs/merge-two-tasks"
TUNEFORGE="${TUNEFORGE:-.venv/bin/tuneforge}"

for task in arithmetic state_tracking; do
  if [ ! -f "$RUNS/$task/adapter/adapter_config.json" ]; then
    "$TUNEFORGE" train "$HERE/$task.yaml" "training.max_steps=$STEPS" "training.batch_size=$BATCH" --overwrite
  fi
done

for method in ties linear task_arithmetic; do
  "$TUNEFORGE" merge "$HERE/$method.yaml" "$RUNS/merged-$method" --overwrite
done

for task in arithmetic state_tracking; do
  "$TUNEFORGE" eval --data "$task" --limit "$LIMIT" --max-new-tokens 8 --samples 0 --device cpu \
    --metrics loss,exact_match \
    --adapter "arithmetic=$RUNS/arithmetic/adapter" \
    --adapter "state_tracking=$RUNS/state_tracking/adapter" \
    --adapter "ties=$RUNS/merged-ties" \
    --adapter "linear=$RUNS/merged-linear" \
    --adapter "task_arithmetic=$RUNS/merged-task_arithmetic" \
    --output "$RUNS/eval-$task.json"
done
