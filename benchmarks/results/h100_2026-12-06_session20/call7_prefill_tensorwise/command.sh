# device call of session 20 (H100 80GB HBM3): the prefill GEMMs again, with _scaled_mm at tensor-wise scales (timing only)
export PYTHONPATH=$PWD; nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/machine.txt; timeout 120 python3 benchmarks/bench_fp8_decode.py --skip decode --out $OUT/prefill_tensorwise.json > $OUT/prefill_tensorwise.log 2>&1
