# device call 2 of session 22 (build = commit 3329b06; the device copy's git HEAD is stale), the same warm H100 as call 1:
# (a) session 21's confirmation A/B: old = 08e148b vs this build, token VLAs in bf16, two rounds;
# (b) profiles of OpenVLA, FP8 and bf16 (one call without a graph, GPU time per kernel).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/call2; rm -rf $R; mkdir -p $R
pack() { echo "$1 rc $2" >> $R/steps.txt; tar czf $OUT/call2.tgz -C $R . ; cp $R/steps.txt $OUT/; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
OUT=$R/ab ITERS=30 BUILDS="old new" GROUPS_TO_BENCH="token" ROUNDS="1 2" VERIFY= SKIP_TESTS=1 BUDGET=170 timeout 200 bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1; pack ab $?
cp $R/ab/summary.txt $OUT/ 2>/dev/null
timeout 100 python3 -m cortexflow.cli profile --model openvla --backend triton --size real --precision fp8 --top 30 --json $R/profile_openvla_fp8.json > $R/profile_openvla_fp8.txt 2>&1; pack profile_fp8 $?
timeout 100 python3 -m cortexflow.cli profile --model openvla --backend triton --size real --top 30 --json $R/profile_openvla.json > $R/profile_openvla.txt 2>&1; pack profile_bf16 $?
