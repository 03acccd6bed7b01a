# Device call B of session 33 (~9.5 min on an H100; carry old_build.tar = `git archive 31f42c6`):
# 1. The bf16 expert's load order (session 32's NOTES): 31f42c6 (each K step's weight tiles loaded before the rows'
#    tile, as call 3's bf16 rounds ran) against this build (rows first, session 30's kernel), Pi0 1/2/3 views, two
#    interleaved rounds of 100 calls, no verify (the bf16 kernels' arithmetic is the same).
# 2. The FP8 cache's start-up times (session 32's call4_fp8_cache.sh): OpenVLA-7B created with precision="fp8"
#    without the cache, with an empty one and with the entry, the page cache emptied before each.
# 3. A torch-profiler breakdown of one Pi0 call (2 views, bf16, this build): where the time goes now.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$OUT; mkdir -p $R/grid
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $R/machine.txt
OUT=$R/grid BUDGET=300 BUILDS="old new" GROUPS_TO_BENCH="pi0" VERIFY="" ROUNDS="1 2" SKIP_TESTS=1 \
  bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/grid.log 2>&1; echo "grid rc $?" >> $R/steps.txt
tail -12 $R/grid/summary.txt 2>/dev/null
timeout 170 python3 benchmarks/bench_fp8_cache.py --dir /tmp/fp8_cache_bench --out $R/fp8_cache.json \
  --drop-caches > $R/fp8_cache.log 2>&1; echo "fp8 cache rc $?" >> $R/steps.txt; grep -v Warning $R/fp8_cache.log | tail -8
timeout 90 python3 -m cortexflow.cli profile --model pi0 --backend triton --views 2 --size real --device cuda \
  --top 30 --json $R/profile_pi0.json > $R/profile_pi0.txt 2>&1; echo "profile rc $?" >> $R/steps.txt
head -40 $R/profile_pi0.txt; cat $R/steps.txt
