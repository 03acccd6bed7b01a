# Session 32, call 3 (this tree: the FP8 expert's new default tiling).
# 1. bf16 against --precision fp8 on this build, two interleaved rounds of 100 calls: Pi0 1/2/3 views, Pi0.5
#    prompts 20 and 60 (no verify: call 2 verified FP8).
# 2. benchmarks/bench_fp8_cache.py: OpenVLA-7B (random bf16 weights, published size) created with precision="fp8"
#    without the cache, with an empty one (miss) and with the entry (hit), the page cache emptied before each.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $OUT/machine.txt
mkdir -p $OUT/grid
OUT=$OUT/grid BUDGET=200 BUILDS="new fp8" GROUPS_TO_BENCH="pi0 pi05" VERIFY="" VERIFY_FP8="" \
  ROUNDS="1 2" ITERS=100 SKIP_TESTS=1 bash benchmarks/gpu_triton_check.sh final 2>&1 | tail -8
timeout 330 python3 benchmarks/bench_fp8_cache.py --dir /tmp/fp8_cache_bench --out $OUT/fp8_cache.json \
  --drop-caches > $OUT/fp8_cache.log 2>&1; grep -v Warning $OUT/fp8_cache.log | tail -8
