#!/usr/bin/env bash
# Evaluate the best checkpoint of a run, of any method, with the paper's protocol (2,000 samples, 10 steps of
# the checkpoint's sampler, e.g. Euler for flow matching, test split).
#   bash run_eval_best.sh [RUN_DIR] [extra evaluate.py args]
#   bash run_eval_best.sh checkpoints/comet_camus --inception_weights W.pth --clip_dir CLIP_DIR
#   bash run_eval_best.sh checkpoints/quickstart --num_samples 160 --skip_missing_metrics   # minutes on a CPU
# RUN_DIR defaults to checkpoints/quickstart (what `bash train.sh` trains). Results go to
# RUN_DIR/eval_best-..._test_10steps/. The checkpoint is chosen in Python (lowest val/loss). Extra arguments
# come after the protocol's, so a later --num_samples, --num_steps or --split replaces it (2,000 samples take
# hours on a CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash setup.sh >/dev/null
run_dir=${1:-checkpoints/quickstart}
[[ $# -gt 0 ]] && shift
exec .venv/bin/python evaluate.py --checkpoint "$run_dir" --which best --num_samples 2000 --num_steps 10 \
  --split test "$@" </dev/null
