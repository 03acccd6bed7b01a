# device call of session 20 (H100 80GB HBM3): old = 659de57, new = ba3d0be (FP8 gate/up tiling, logits in 4 parts),
# each also with --precision fp8 (oldfp8 / fp8), one round
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 90 python3 -m pytest -q tests/test_precision.py tests/test_expert_layer.py tests/test_decode_gemv.py -k "host or real_size or fp8" > $R/tests.log 2>&1; echo "tests rc $?" >> $R/steps.txt
OUT=$OUT/ab ITERS=30 BUILDS="old new oldfp8 fp8" GROUPS_TO_BENCH="token pi0" ROUNDS=1 VERIFY= SKIP_TESTS=1 BUDGET=390 bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1; echo "ab rc $?" >> $R/steps.txt
cd $OUT && tar czf results.tgz r && cp r/steps.txt r/tests.log r/ab.log . ; ls $OUT $OUT/ab
