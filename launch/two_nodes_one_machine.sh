#!/usr/bin/env bash
# Two "nodes" on one machine: two torchrun agents joined by a c10d rendezvous on 127.0.0.1,
# each with its own node-local root (what tmp:// resolves to), as on a real cluster.
#   launch/two_nodes_one_machine.sh OUTDIR -- [train.py flags]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: two_nodes_one_machine.sh OUTDIR -- [train.py flags]}"; shift
[ "${1:-}" = "--" ] && shift
port="${PORT:-$(${PYTHON:-python} -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
mkdir -p "$out/node0" "$out/node1"; chmod 700 "$out/node0" "$out/node1"
pids=()
for n in 0 1; do
  DIST_GUARDIAN_NODE_LOCAL_ROOT="$out/node$n" NNODES=2 NPROC="${NPROC:-1}" RDZV_ENDPOINT="127.0.0.1:$port" \
    RDZV_ID="two-nodes-$port" MAX_RESTARTS="${MAX_RESTARTS:-0}" "$here/run_multi_node.sh" -- "$@" \
    > "$out/node$n.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit "$rc"
