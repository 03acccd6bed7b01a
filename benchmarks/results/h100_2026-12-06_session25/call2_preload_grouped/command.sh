# device call 2 of session 25 (new build = the commit adding this file; old = old_build.tar = 3992919, this session's
# start; the device copy's git HEAD is stale). Call 1 (an H200): the decode attention's cache preload made OpenVLA
# +0.8 % slower in bf16 and RT-2 0.6 / 1.0 % faster (bf16 / FP8); this build preloads only in LMs whose query heads
# share a KV head (preload_decode_keys="grouped": RT-2), so OpenVLA runs the old path. With ~400 s of device time
# left, one lean A/B: opt = this build with fused_combine=all, i.e. OpenVLA's key ranges merged by the last arriver
# without the preload (call 1 timed that merge only with the preload), and RT-2 as this build runs it by default
# (the preload and its grouped merge), a second measurement of call 1's RT-2 gain.
# Prediction: OpenVLA opt/old −0.3 to −0.7 %; RT-2 opt/old −0.6 / −1.0 % (bf16 / FP8).
# Steps pack OUT/call2.tgz: old / opt, bf16 and FP8, token VLAs, two interleaved rounds of 30 calls.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s25call2; rm -rf $R; mkdir -p $R
pack() { echo "$1 rc $2" >> $R/steps.txt; tar czf $OUT/call2.tgz -C $R . ; cp $R/steps.txt $OUT/; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
OUT=$R/ab ITERS=30 BUILDS="old opt oldfp8 optfp8" OPT_OPTIONS="fused_combine=all" GROUPS_TO_BENCH="token" \
  ROUNDS="1 2" VERIFY="" VERIFY_FP8="" SKIP_TESTS=1 BUDGET=230 timeout 240 \
  bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1; pack ab $?
cp $R/ab/summary.txt $OUT/ 2>/dev/null
