#!/usr/bin/env bash
# One GPU call: the bench grid of the Triton backend (CUDA graphs on, default settings); A/B runs (bench +
# real-size verify) with the fused split combine, the split-K skinny GEMMs, all opt-in kernels (those two
# and the Triton patch embedding), and folded norms;
# OpenVLA-7B latency (PyTorch eager, PyTorch + graphs, Triton + graphs) and profile; kernel micro-benchmarks; the
# Triton and token-VLA tests on the real GPU; module-by-module verify at real size and a per-kernel
# profile. Everything lands in $OUT; each step has its own time limit so one slow step cannot eat the
# rest. PyTorch-backend Pi0 numbers come from bench_pytorch_baseline.py.
#   bash benchmarks/gpu_triton_check.sh            # on the GPU machine; OUT=... to choose the folder
#   QUICK=1 bash benchmarks/gpu_triton_check.sh    # ~6 min: bench grid + A/B runs, OpenVLA (30 calls), verify Pi0
set -u
QUICK="${QUICK:-0}"; ITERS=100; [ "$QUICK" = 1 ] && ITERS=30
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results/latest}"; mkdir -p "$OUT"
step() { local limit=$1; shift; timeout "$limit" "$@" || echo "step failed or timed out (rc $?): $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'python', sys.version.split()[0])" | tee -a "$OUT/gpu.txt"
BENCH=(python3 -m cortexflow.cli bench --backends triton --graphs on --iters "$ITERS" --warmup 5)
step 120 "${BENCH[@]}" --models pi0 --views 1,2,3 --prompt-len 20 --json "$OUT/bench_pi0.json" 2>&1 | tail -6
step 60 "${BENCH[@]}" --models pi05 --views 2 --prompt-len 60 --json "$OUT/bench_pi05.json" 2>&1 | tail -6
step 60 env CORTEXFLOW_TRITON_FUSED_COMBINE=1 "${BENCH[@]}" --models pi0 --views 2 --prompt-len 20 \
  --json "$OUT/bench_pi0_fused_combine.json" 2>&1 | tail -6
step 60 env CORTEXFLOW_TRITON_FUSED_COMBINE=1 python3 -m cortexflow.cli verify --model pi0 --backend triton --size real \
  --device cuda --dtype bfloat16 --json "$OUT/verify_pi0_fused_combine.json" 2>&1 | tail -4
for variant in "CORTEXFLOW_TRITON_SKINNY_GEMM=1 skinny_gemm" \
               "CORTEXFLOW_TRITON_SKINNY_GEMM=1 CORTEXFLOW_TRITON_FUSED_COMBINE=1 CORTEXFLOW_TRITON_PATCH_EMBED=1 all_opt_in"; do
  set -- $variant; tag=${!#}; flags=("${@:1:$#-1}")
  step 90 env "${flags[@]}" "${BENCH[@]}" --models pi0,pi05 --views 2 --prompt-len 20,60 \
    --json "$OUT/bench_$tag.json" 2>&1 | tail -6
  step 60 env "${flags[@]}" python3 -m cortexflow.cli verify --model pi0 --backend triton --size real \
    --device cuda --dtype bfloat16 --json "$OUT/verify_pi0_$tag.json" 2>&1 | tail -4
done
[ "$QUICK" = 1 ] || step 60 env CORTEXFLOW_TRITON_FOLD_NORMS=1 "${BENCH[@]}" --models pi0 --views 2 --prompt-len 20 \
  --json "$OUT/bench_pi0_folded.json" 2>&1 | tail -6
step 150 python3 benchmarks/bench_openvla.py --iters "$ITERS" --json "$OUT/bench_openvla.json" 2>&1 | tail -8
step 150 env CORTEXFLOW_TRITON_SKINNY_GEMM=1 python3 benchmarks/bench_openvla.py --iters "$ITERS" \
  --json "$OUT/bench_openvla_skinny_gemm.json" 2>&1 | tail -8
step 90 python3 -m cortexflow.cli profile --model openvla --backend triton --size real --prompt-len 26 --top 25 \
  --json "$OUT/profile_openvla_triton.json" 2>&1 | tail -40
if [ "$QUICK" = 1 ]; then
  step 60 python3 -m cortexflow.cli verify --model pi0 --backend triton --size real --device cuda --dtype bfloat16 \
    --json "$OUT/verify_pi0.json" 2>&1 | tail -6
  exit 0
fi
step 120 python3 benchmarks/micro_decoder_kernels.py 2>&1 | tee "$OUT/micro.txt" | tail -30
step 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_openvla.py tests/test_rt2.py 2>&1 | tail -5 | tee "$OUT/kernel_tests.txt"
for model in pi0 pi05; do
  step 60 python3 -m cortexflow.cli verify --model "$model" --backend triton --size real --device cuda --dtype bfloat16 \
    --json "$OUT/verify_$model.json" 2>&1 | tail -6
done
step 60 python3 -m cortexflow.cli profile --model pi0 --backend triton --views 2 --size real \
  --top 30 --json "$OUT/profile_pi0_triton.json" 2>&1 | tail -40
