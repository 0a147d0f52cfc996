#!/usr/bin/env bash
# One node, N ranks, restarted by torchrun on failure; dist_guardian resumes every restart.
#   launch/run_single_node.sh [NPROC] [MAX_RESTARTS] -- [train.py flags...]
# Example: launch/run_single_node.sh 2 3 -- --stores checkpoints/ tmp://run-1 --steps 100
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
nproc="${1:-2}"; max_restarts="${2:-3}"
shift $(( $# >= 2 ? 2 : $# )); [ "${1:-}" = "--" ] && shift
# torch 2.13's elastic agent shares one rendezvous TCPStore across restarts, and restarted
# workers can dial the dead attempt's gloo addresses (research/ecosystem.md: 1 of 9 clean
# restarts without this, 6 of 6 with). A fresh store per restart fixes it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc-per-node="$nproc" \
    --max-restarts="$max_restarts" "$here/train.py" "$@"
