# device call 3 of session 21: old = 08e148b (the session's start), new = this build (fp8_linear with a bf16
# unscaled product, decode GEMVs with K groups and prefetch), each also with --precision fp8 (oldfp8 / fp8), the
# token VLAs only (nothing else changed), two rounds; real-size verify of OpenVLA in bf16 and FP8
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/machine.txt
OUT=$OUT/ab ITERS=30 BUILDS="old new oldfp8 fp8" GROUPS_TO_BENCH="token" ROUNDS="1 2" VERIFY=openvla VERIFY_FP8=openvla SKIP_TESTS=1 BUDGET=540 bash benchmarks/gpu_triton_check.sh final old_build.tar > $OUT/ab.log 2>&1; echo "ab rc $?" >> $OUT/ab.log
# Note: builds.json / summary.json name the new build's commit as 08e148b (the device copy's git HEAD, stale); the
# new build is the working tree at 3f22540 (package /work/main/cortexflow), the old one old_build.tar = 08e148b.
# Each bench_*.json in ab/results.tgz has "environment": NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0.
