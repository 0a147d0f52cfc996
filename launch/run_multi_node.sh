#!/usr/bin/env bash
# One node of a multi-node job (c10d rendezvous). Run it on every node with the same
# RDZV_ENDPOINT (host:port of any one node) and RDZV_ID; torchrun assigns node ranks.
#   NNODES=2 NPROC=8 RDZV_ENDPOINT=node0:29400 RDZV_ID=job42 launch/run_multi_node.sh -- [train.py flags]
# The primary store (first --stores URL) must be shared by every node (NFS, Lustre, s3://);
# tmp://NAME is node-local scratch: a checkpoint only some nodes hold is skipped by the
# availability vote, never half-loaded.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ "${1:-}" = "--" ] && shift
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${PYTHON:-python}" -m torch.distributed.run --nnodes="${NNODES:-2}" --nproc-per-node="${NPROC:-1}" \
    --rdzv-backend=c10d --rdzv-endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}" \
    --rdzv-id="${RDZV_ID:-dist_guardian}" --max-restarts="${MAX_RESTARTS:-3}" "$here/train.py" "$@"
