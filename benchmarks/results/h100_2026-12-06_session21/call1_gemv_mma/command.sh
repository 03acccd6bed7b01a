# device call 1 of session 21: GPU tests of the tensor-core GEMV and fp8_linear, the FP8 prefill GEMMs, and the
# decode chain's tilings with the tensor-core GEMV (fp8, then bf16)
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/machine.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $OUT/machine.txt
timeout 80 python3 -m pytest -q -x tests/test_decode_gemv.py tests/test_fp8_gemm.py > $OUT/tests.log 2>&1; echo "rc $?" >> $OUT/tests.log
timeout 90 python3 benchmarks/bench_fp8_decode.py --skip decode --out $OUT/prefill.json > $OUT/prefill.log 2>&1; echo "rc $?" >> $OUT/prefill.log
OUT=$OUT timeout 175 python3 benchmarks/micro_decode_chain.py --fp8 --kinds mma > $OUT/chain_fp8.log 2>&1; echo "rc $?" >> $OUT/chain_fp8.log
OUT=$OUT timeout 175 python3 benchmarks/micro_decode_chain.py --kinds mma > $OUT/chain_bf16.log 2>&1; echo "rc $?" >> $OUT/chain_bf16.log
