# device call of session 20 (H100 80GB HBM3): the FP8 prefill GEMMs against bf16 at OpenVLA shapes, 280 rows
export PYTHONPATH=$PWD; nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/machine.txt; timeout 150 python3 benchmarks/bench_fp8_decode.py --skip decode --out $OUT/prefill.json > $OUT/prefill.log 2>&1
