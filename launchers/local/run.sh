#!/usr/bin/env bash
# Train on one machine: launchers/local/run.sh NPROC CONFIG [section.key=value ...]
# The same entry point and config as the Slurm launcher; torchrun provides the ranks.
set -euo pipefail
if [[ $# -lt 2 || "$1" == "-h" || "$1" == "--help" ]]; then
  echo "usage: $0 NPROC CONFIG [section.key=value ...]"
  echo "  e.g. $0 2 configs/ae/tiny.yaml parallel.zero_stage=2 run.name=my_ae"
  exit 2
fi
nproc=$1; shift
here=$(cd "$(dirname "$0")/../.." && pwd)
torchrun=torchrun
[[ -x "$here/.venv/bin/torchrun" ]] && torchrun="$here/.venv/bin/torchrun"
export PYTHONFAULTHANDLER=1 DS_ACCELERATOR=${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null && echo cuda || echo cpu)}
exec "$torchrun" --standalone --nproc_per_node "$nproc" -m calm_megatron.train "$@"
