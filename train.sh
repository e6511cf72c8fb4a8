#!/usr/bin/env bash
# Train COMET. With no arguments: sets up .venv, builds the small synthetic echo set and trains
# configs/quickstart.yaml on whatever is here (CPU or GPUs).
#   bash train.sh [CONFIG] [--set section.key=value ...]
#   nohup bash train.sh configs/comet_camus.yaml > training.log 2>&1 &
# Multi-GPU: every visible GPU is used (CUDA_VISIBLE_DEVICES=0,1 bash train.sh ...).
# Multi-node: launch this script under torchrun or SLURM with train_args.num_nodes set; Lightning
# reads the cluster environment.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash setup.sh
config=${1:-configs/quickstart.yaml}
[[ $# -gt 0 ]] && shift
exec .venv/bin/python trainer.py --config_path "$config" "$@" </dev/null
