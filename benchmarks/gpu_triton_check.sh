#!/usr/bin/env bash
# One GPU call: Triton kernel tests on the real GPU, kernel micro-benchmarks, the bench grid (Triton,
# CUDA graphs on; folded norms on and off), module-by-module verify at real size, and a per-kernel
# profile. Everything lands in $OUT. PyTorch-backend numbers come from bench_pytorch_baseline.py.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results/latest}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py 2>&1 | tail -5 | tee "$OUT/kernel_tests.txt"
python3 benchmarks/micro_decoder_kernels.py 2>&1 | tee "$OUT/micro.txt" | tail -40
python3 -m cortexflow.cli bench --models pi0 --backends triton --views 1,2,3 --prompt-len 20 --graphs on \
  --iters 100 --warmup 10 --json "$OUT/bench_pi0.json" 2>&1 | tail -8
python3 -m cortexflow.cli bench --models pi05 --backends triton --views 2 --prompt-len 60 --graphs on \
  --iters 100 --warmup 10 --json "$OUT/bench_pi05.json" 2>&1 | tail -6
CORTEXFLOW_TRITON_FOLD_NORMS=0 python3 -m cortexflow.cli bench --models pi0 --backends triton --views 2 \
  --prompt-len 20 --graphs on --iters 100 --warmup 10 --json "$OUT/bench_pi0_unfolded.json" 2>&1 | tail -6
for model in pi0 pi05; do
  python3 -m cortexflow.cli verify --model "$model" --backend triton --size real --device cuda --dtype bfloat16 \
    --json "$OUT/verify_$model.json" 2>&1 | tail -16
done
python3 -m cortexflow.cli profile --model pi0 --backend triton --views 2 --size real \
  --top 30 --json "$OUT/profile_pi0_triton.json" 2>&1 | tail -45
