# device call 1 of session 25 (new build = the commit adding this file; old = old_build.tar = 3992919, this session's
# start; the device copy's git HEAD is stale). A decode step's attention with PDL loads each key range's first
# block of the KV cache (every row but the one the step's QKV/RoPE GEMV writes) and its mask entries before its PDL
# wait, while the GEMV still runs (`TritonOptions.preload_decode_keys`, default on); the fresh row is read at L2
# after the wait. opt = the new build with fused_combine=all (the last-arriving range program merges, no combine
# launch, in OpenVLA's Llama too). Prediction: −1 to −2 µs a layer-step (the cache's HBM round trip off the chain):
# OpenVLA −0.2 to −0.4 ms in bf16 and FP8, RT-2 −2 to −4 ms; fused_combine=all: −0 to −0.3 ms on OpenVLA.
# Steps pack OUT/call1.tgz: (1) GPU tests of the attention, the PDL chains (with and without the preload) and the
# token VLAs' Triton paths; (2) old / new / opt, bf16 and FP8, token VLAs, two interleaved rounds of 30 calls;
# verify OpenVLA (bf16) and RT-2 (FP8) at real size.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s25call1; rm -rf $R; mkdir -p $R
pack() { echo "$1 rc $2" >> $R/steps.txt; tar czf $OUT/call1.tgz -C $R . ; cp $R/steps.txt $OUT/; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 130 python3 -m pytest -q -p no:cacheprovider tests/test_pdl.py tests/test_triton_kernels.py \
  tests/test_token_tools.py -k "attention or pdl or chain or combine or fresh" > $R/tests.log 2>&1; pack tests $?
OUT=$R/ab ITERS=30 BUILDS="old new opt oldfp8 fp8 optfp8" OPT_OPTIONS="fused_combine=all" GROUPS_TO_BENCH="token" \
  ROUNDS="1 2" VERIFY="openvla" VERIFY_FP8="rt2" SKIP_TESTS=1 BUDGET=380 timeout 400 \
  bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1; pack ab $?
cp $R/ab/summary.txt $OUT/ 2>/dev/null
