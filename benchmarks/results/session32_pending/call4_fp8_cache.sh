# Pending device call (session 32; it replaces session 31's fp8_cache_call.sh): benchmarks/bench_fp8_cache.py after the fingerprint fix (call 3's run stopped at a device-side
# assert in weights_fingerprint): OpenVLA-7B (random bf16 weights, published size) created with precision="fp8"
# without the cache, with an empty one (miss) and with the entry (hit), the page cache emptied before each.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $OUT/machine.txt
timeout 220 python3 benchmarks/bench_fp8_cache.py --dir /tmp/fp8_cache_bench --out $OUT/fp8_cache.json \
  --drop-caches > $OUT/fp8_cache.log 2>&1; grep -v Warning $OUT/fp8_cache.log | tail -8
