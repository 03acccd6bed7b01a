# Pending device call, written in session 31 and not run there (its device budget went to failed starts): the FP8
# weight cache on a GPU, for the build that holds it (main from 863ceb5 on). About 5 min on an H100.
# 1. tests/test_fp8_cache.py with the real FP8 kernels (no interpreter).
# 2. benchmarks/bench_fp8_cache.py: OpenVLA-7B (random bf16 weights, published size) created with precision="fp8"
#    without the cache, with an empty one (miss) and with the entry (hit), the page cache emptied before each.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $OUT/machine.txt
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_cache.py > $OUT/tests.log 2>&1; tail -3 $OUT/tests.log
timeout 250 python3 benchmarks/bench_fp8_cache.py --dir /tmp/fp8_cache_bench --out $OUT/fp8_cache.json --drop-caches 2>&1 | grep -v Warning | tail -8
df -h /tmp | tail -1
