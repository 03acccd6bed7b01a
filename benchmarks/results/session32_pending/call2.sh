# Session 32, call 2 (this tree).
# 1. micro_expert_layer.py --fp8 --step: the one-layer and step kernels with E4M3 weights: float16 operands (the FP8
#    default), with down's tiles converted by bits (fp8_convert="bits"), and bits with bf16 operands.
# 2. benchmarks/bench_fp8_cache.py: OpenVLA-7B (random bf16 weights, published size) created with precision="fp8"
#    without the cache, with an empty one (miss) and with the entry (hit), the page cache emptied before each.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $OUT/machine.txt
cat $OUT/machine.txt
mkdir -p $OUT/micro; OUT=$OUT/micro timeout 170 python3 benchmarks/micro_expert_layer.py --fp8 --step --no-phases \
  --only "fp8" > $OUT/micro/micro.log 2>&1; grep -E "^(persistent|step kernel)" $OUT/micro/micro.log
timeout 300 python3 benchmarks/bench_fp8_cache.py --dir /tmp/fp8_cache_bench --out $OUT/fp8_cache.json \
  --drop-caches > $OUT/fp8_cache.log 2>&1; grep -v Warning $OUT/fp8_cache.log | tail -8
df -h /tmp | tail -1
