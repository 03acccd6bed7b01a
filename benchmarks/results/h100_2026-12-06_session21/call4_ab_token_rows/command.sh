# device call 4 of session 21: old = 08e148b vs this build (the bf16 decode tilings with rows per program capped so
# that 2048 outputs keep 256 programs; bf16 K groups and prefetch only from width 4096 up, so RT-2 keeps the old
# tilings), the token VLAs in bf16, two rounds, within the device time left
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/machine.txt
OUT=$OUT/ab ITERS=30 BUILDS="old new" GROUPS_TO_BENCH="token" ROUNDS="1 2" VERIFY= SKIP_TESTS=1 BUDGET=200 bash benchmarks/gpu_triton_check.sh final old_build.tar > $OUT/ab.log 2>&1; echo "ab rc $?" >> $OUT/ab.log
