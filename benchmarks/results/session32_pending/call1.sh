# Session 32, call 1: fp8_operands="f16" as the FP8 default (new = this tree, old = 34b6e1e as old_build.tar).
# 1. The FP8 / f16 GPU tests of the expert layer and step kernels and of the E4M3 -> bf16 conversion by bits.
# 2. Whole predict, --precision fp8, old and new interleaved in two rounds of 100 calls; Pi0 1/2/3 views,
#    Pi0.5 prompts 20 and 60; real-size verify --precision fp8 of Pi0 and Pi0.5 with the new build.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $OUT/machine.txt
cat $OUT/machine.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_e4m3.py tests/test_expert_layer.py tests/test_expert_step.py \
  -k "fp8 or f16 or float16 or e4m3 or bits or code" > $OUT/tests.log 2>&1; tail -4 $OUT/tests.log
mkdir -p $OUT/grid
OUT=$OUT/grid BUDGET=370 BUILDS="oldfp8 fp8" GROUPS_TO_BENCH="pi0 pi05" VERIFY="" VERIFY_FP8="pi0 pi05" \
  ROUNDS="1 2" ITERS=100 SKIP_TESTS=1 bash benchmarks/gpu_triton_check.sh final old_build.tar 2>&1 | tail -30
