# device call 2 of session 25 (new build = the commit adding this file; old = old_build.tar = 3992919, this session's
# start; the device copy's git HEAD is stale). Call 1 (an H200): the decode attention's cache preload made OpenVLA
# +0.8 % slower in bf16 and RT-2 0.6 / 1.0 % faster (bf16 / FP8); new = the preload only in LMs whose query heads
# share a KV head (preload_decode_keys="grouped": RT-2), so OpenVLA's path is the old one again. opt = new with
# fused_combine=all: OpenVLA's key ranges merged by the last arriver, without the preload this time (call 1 timed
# it only with the preload). Prediction: new/old OpenVLA 0 %, RT-2 −0.6 / −1.0 %; opt/new OpenVLA −0.3 to −0.7 %.
# Steps pack OUT/call2.tgz: (1) the attention's GPU tests; (2) old / new / opt, bf16 and FP8, token VLAs, two
# interleaved rounds of 30 calls; (3) what is left of the limit: RT-2's FP8 decode tilings in the chained decode
# (session 24's unrun call 4, micro_decode_chain.py --model rt2 --fp8 --schedules).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s25call2; rm -rf $R; mkdir -p $R
pack() { echo "$1 rc $2" >> $R/steps.txt; tar czf $OUT/call2.tgz -C $R . ; cp $R/steps.txt $OUT/; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_pdl.py \
  -k "fresh or chain" > $R/tests.log 2>&1; pack tests $?
OUT=$R/ab ITERS=30 BUILDS="old new opt oldfp8 fp8 optfp8" OPT_OPTIONS="fused_combine=all" GROUPS_TO_BENCH="token" \
  ROUNDS="1 2" VERIFY="" VERIFY_FP8="" SKIP_TESTS=1 BUDGET=300 timeout 310 \
  bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1; pack ab $?
cp $R/ab/summary.txt $OUT/ 2>/dev/null
OUT=$R timeout 150 python3 benchmarks/micro_decode_chain.py --model rt2 --fp8 --schedules --projections o,qkv,down \
  > $R/chain.log 2>&1; pack chain $?
