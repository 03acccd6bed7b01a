# device call of session 20 (H100 80GB HBM3): the FP8 load from the host vs from the GPU (OpenVLA-7B), the FP8 tests,
# Pi0 A/B of 0d2c7a3 (logits in 4 parts) against 659de57 (one product) in two rounds, verify OpenVLA with FP8
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 100 python3 benchmarks/bench_fp8_load.py --model openvla --out $R/fp8_load.json > $R/fp8_load.log 2>&1; echo "load rc $?" >> $R/steps.txt
timeout 40 python3 -m pytest -q tests/test_precision.py -k "verify_with or host" > $R/tests.log 2>&1; echo "tests rc $?" >> $R/steps.txt
OUT=$OUT/ab ITERS=50 BUILDS="old new" GROUPS_TO_BENCH="pi0" ROUNDS="1 2" VERIFY= VERIFY_FP8=openvla SKIP_TESTS=1 BUDGET=250 bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1; echo "ab rc $?" >> $R/steps.txt
cd $OUT && tar czf results.tgz r && cp r/steps.txt r/tests.log r/fp8_load.log . ; ls $OUT $OUT/ab
