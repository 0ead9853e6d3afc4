#!/usr/bin/env bash
# The real-weights measurement (docs/benchmarks.md "Real pretrained weights"): the SmolLM2
# profile through the whole flow (evaluation with grounded arguments, the default), then the same
# three models decoding freely, then the markdown report in results/report.md.
#
#   bench/real_weights.sh [--set key=value ...]     # extra budgets, e.g. --set sft.max_examples=100
#
# It rewrites params.yaml and fills data/, models/, metrics/: run it in a throwaway clone
# (`git clone . /tmp/rw && cd /tmp/rw && source .venv/bin/activate && nice -n 19 bench/real_weights.sh`).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p results/grounded results/free
stamp() { date -u +%H:%M:%S; }
echo "[$(stamp)] flow: tracetune run --profile params-smollm2.yaml $*"
tracetune run --profile params-smollm2.yaml "$@"
echo "[$(stamp)] flow exit $?"
cp metrics/*.json results/grounded/ 2>/dev/null
python bench/real_weights_report.py . > results/report.md
python -c "from pathlib import Path; from flows.retrain import override_params; \
override_params(Path('params.yaml'), {'environment.grounded_arguments': False})"
: > results/free/seconds.txt
for model in base sft rlvr; do  # base first: sft and rlvr reuse its free rollouts as baseline
  [ -d "models/$model" ] || continue
  echo "[$(stamp)] free decoding: evaluate $model"
  begin=$(date +%s)
  python -m tasks.evaluate "$model" && cp "metrics/eval_$model.json" results/free/
  echo "$model $(( $(date +%s) - begin ))" >> results/free/seconds.txt
  python bench/real_weights_report.py . > results/report.md
done
echo "[$(stamp)] done"
cat results/report.md
