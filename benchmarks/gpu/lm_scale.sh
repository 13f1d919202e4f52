#!/usr/bin/env bash
# Distillation at LLM scale on this machine's NVIDIA GPU(s), in under 8 minutes: a random 1.1 B Llama teacher and a
# 0.25 B student through distill's own training loop; tokens/s and peak memory for fp32 vs bf16, with and without
# activation checkpointing, LoRA vs full, the chunked loss vs the naive one, DDP/FSDP when there are several GPUs.
# Writes benchmarks/results/gpu_lm_scale.json and prints a table; exits non-zero when anything failed.
#
#   bash benchmarks/gpu/lm_scale.sh                                          # on the GPU machine, from the repo
#   bash benchmarks/gpu/lm_scale.sh --tiny --device cpu --out /tmp/x.json    # the check the tests run on a CPU
#
# PYTHON names the interpreter with distill installed (default: python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-8}" TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
status=0
# The script keeps to its own deadline (400 s); this is the backstop. SIGINT first: the JSON so far is kept.
timeout --signal=INT --kill-after=20 460 "${PYTHON:-python3}" "$here/lm_scale.py" "$@" || status=$?
if [ "$status" -ne 0 ]; then
    echo "lm_scale.sh: the benchmark failed (exit status $status; 124: it ran past 460 s)" >&2
fi
exit "$status"
