#!/usr/bin/env bash
# Profile one compile batch of the d768 preset on a GPU (device tool): python-side hot spots
# (cProfile) and the CUDA kernel table (torch.profiler). Writes into $OUT.
set -eu
python3 -W ignore -m cProfile -o "$OUT/compile.prof" bench/compile_throughput.py --preset d768 --facts 16384 \
  --batch 16384 --greedy-check 0 ${EXTRA:-} --json > "$OUT/profile_run.json"
python3 - <<'PY'
import os, pstats
p = pstats.Stats(os.path.join(os.environ["OUT"], "compile.prof"))
p.sort_stats("tottime").print_stats(25)
PY
cat "$OUT/profile_run.json"
