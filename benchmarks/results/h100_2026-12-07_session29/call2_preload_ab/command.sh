# Device call 2 of session 29: session 25's H100 preload A/B (written as h200_2026-12-06_session25/call2_h100_ab_unrun/command.sh, removed after it ran here),
# run as written with old_build25.tar = `git archive 3992919` (session 25's start) in place of old_build.tar; new build = 8b1f8d7.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s26ab; rm -rf $R; mkdir -p $R
pack() { echo "$1 rc $2" >> $R/steps.txt; tar czf $OUT/call.tgz -C $R . ; cp $R/steps.txt $OUT/; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_pdl.py \
  -k "fresh or chain or attention" > $R/tests.log 2>&1; pack tests $?
OUT=$R/ab ITERS=30 BUILDS="old new oldfp8 fp8" GROUPS_TO_BENCH="token" ROUNDS="1 2" VERIFY="rt2" VERIFY_FP8="rt2" \
  SKIP_TESTS=1 BUDGET=330 timeout 340 bash benchmarks/gpu_triton_check.sh final old_build25.tar > $R/ab.log 2>&1
pack ab $?
cp $R/ab/summary.txt $OUT/ 2>/dev/null; tail -5 $R/tests.log; tail -30 $R/ab.log
