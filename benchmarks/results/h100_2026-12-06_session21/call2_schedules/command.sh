# device call 2 of session 21: GPU tests of the decode GEMVs (K group, prefetch) and fp8_linear (bf16 product),
# then the chained decode's K-group / prefetch schedules, E4M3 and bf16
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/machine.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $OUT/machine.txt
timeout 90 python3 -m pytest -q tests/test_decode_gemv.py tests/test_fp8_gemm.py > $OUT/tests.log 2>&1; echo "rc $?" >> $OUT/tests.log
OUT=$OUT timeout 230 python3 benchmarks/micro_decode_chain.py --fp8 --schedules > $OUT/chain_fp8.log 2>&1; echo "rc $?" >> $OUT/chain_fp8.log
OUT=$OUT timeout 230 python3 benchmarks/micro_decode_chain.py --schedules > $OUT/chain_bf16.log 2>&1; echo "rc $?" >> $OUT/chain_bf16.log
