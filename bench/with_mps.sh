#!/usr/bin/env bash
# Run a command with the NVIDIA Multi-Process Service (MPS) daemon up, and stop the daemon after,
# however the command ends. Several processes sharing one GPU then run their kernels side by side
# instead of time-slicing the GPU (bench/RESULTS.md, 2026-12-02 twelfth session: four d768
# compile processes on one H200, 34,541 facts/s under MPS against 28,150 without).
#
#   bash bench/with_mps.sh python3 bench/compile_throughput.py --preset d768 --attn eager \
#       --compiled-step on --facts 524288 --batch 32768 --prefix-groups 4 --processes 4 --json
#
# Needs nvidia-cuda-mps-control on PATH and the right to start it (root, or the GPU's owner). A
# daemon already running (a node that runs MPS for its own workers) is used and left running.
set -euo pipefail
if ! command -v nvidia-cuda-mps-control >/dev/null; then
  echo "with_mps.sh: nvidia-cuda-mps-control not found (install the NVIDIA driver's MPS tools, or run without MPS)" >&2
  exit 2
fi
export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}
export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/nvidia-mps-log}
started=0
if [ ! -p "$CUDA_MPS_PIPE_DIRECTORY/control" ]; then
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if said=$(nvidia-cuda-mps-control -d 2>&1); then
    started=1
    echo "with_mps.sh: MPS daemon started ($CUDA_MPS_PIPE_DIRECTORY)" >&2
  elif [[ $said == *"already running"* ]]; then  # one left by a run killed before its trap ran
    echo "with_mps.sh: an MPS daemon is already running; using it" >&2
  else
    echo "with_mps.sh: nvidia-cuda-mps-control -d failed: $said" >&2
    exit 2
  fi
fi
stop() { if [ "$started" = 1 ]; then echo quit | nvidia-cuda-mps-control; echo "with_mps.sh: MPS daemon stopped" >&2; fi; }
trap stop EXIT
# The command runs in the background so that a TERM or INT (timeout(1), Ctrl-C) reaches this
# script at once: it stops the command (its whole process group: --processes members too) and then
# the daemon, instead of leaving both running.
setsid "$@" &
child=$!
trap 'kill -TERM -- -"$child" 2>/dev/null; wait "$child"; exit 143' TERM INT
wait "$child"
