# Device call 2 of session 26, right after call 1 on the same machine: round 2 of the same A/B (builds in reverse
# order), then a profile of the euler build (Pi0 2 views, no graph, GPU time per kernel).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s26call2; rm -rf $R; mkdir -p $R/ab
pack() { echo "$1 rc $2 $(date +%T)" >> $R/steps.txt; tar czf $OUT/call2.tgz -C $R . ; cp $R/steps.txt $OUT/; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
OUT=$R/ab ITERS=30 BUILDS="opt opt2 new" OPT_OPTIONS="expert_launch=euler" OPT2_OPTIONS="expert_launch=step" \
  GROUPS_TO_BENCH="pi0 pi05" ROUNDS="1" VERIFY= SKIP_TESTS=1 BUDGET=330 timeout 340 \
  bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1
pack ab $?
cp $R/ab/summary.txt $OUT/ 2>/dev/null
timeout 120 python3 -m cortexflow.cli profile --model pi0 --backend triton --views 2 --size real \
  --triton-options expert_launch=euler > $R/profile_pi0_euler.txt 2>&1
pack profile $?
