# Written in session 25 for the next GPU session, never ran (no device time was left). Run it on an H100
# (kind nvidia-h100-x1) with old_build.tar = `git archive -o old_build.tar 3992919` (session 25's start) carried, and
# state the new build's commit here (the device copy's git HEAD is stale). Session 25's one call ran on an H200; this
# gives the H100 numbers of its change (preload_decode_keys="grouped": RT-2's decode attention loads its cache before
# the PDL wait; OpenVLA's path unchanged) for the README. Prediction from the H200: RT-2 −0.6 % bf16, −1.0 % FP8;
# OpenVLA 0 %. Steps pack OUT/call.tgz: (1) the attention and PDL-chain GPU tests (the fresh-row test's fp32 tolerance
# was never run on a GPU); (2) old / new, bf16 and FP8, token VLAs, two interleaved rounds of 30 calls; verify RT-2 at
# real size in bf16 and FP8.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s26ab; rm -rf $R; mkdir -p $R
pack() { echo "$1 rc $2" >> $R/steps.txt; tar czf $OUT/call.tgz -C $R . ; cp $R/steps.txt $OUT/; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_pdl.py \
  -k "fresh or chain or attention" > $R/tests.log 2>&1; pack tests $?
OUT=$R/ab ITERS=30 BUILDS="old new oldfp8 fp8" GROUPS_TO_BENCH="token" ROUNDS="1 2" VERIFY="rt2" VERIFY_FP8="rt2" \
  SKIP_TESTS=1 BUDGET=330 timeout 340 bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1
pack ab $?
cp $R/ab/summary.txt $OUT/ 2>/dev/null
