# device call 2 of session 24 (build = the commit adding this file; the device copy's git HEAD is stale). The decode
# step's attention in the QKV/RoPE GEMV's last-arriving program of each KV head (TritonOptions.decode_attention=in_qkv)
# against its own launch (default "launch"). Prediction (OpenVLA): the attention + combine launches cost ~9 µs a
# layer-step (2.8 ms a call with the prefill's); in the GEMV's tail the first KV heads' attention hides behind the
# later heads' weight stream and only the last groups' (~3-5 µs) shows: −4 to −6 µs a layer-step, −0.8 to −1.2 ms on
# OpenVLA in bf16 and FP8. RT-2 (one KV head: one program attends for all 8 query heads at the very end): slower.
# Each step packs OUT/call2.tgz:
# (1) GPU tests of the kernel and of the Triton backend with the option;
# (2) micro_decode_attention.py, OpenVLA bf16 / FP8: launch vs in_qkv at 16 / 32 / 64 keys a step and 16 / 32 with
#     key prefetch, 2 rounds;
# (3) whole predict, new (default) / opt (in_qkv at the kernel's default: 32 keys a step, no key prefetch) / fp8 /
#     optfp8, two interleaved rounds of 30 calls;
# (4) verify --size real of OpenVLA with in_qkv, bf16 and fp8;
# (5) micro_decode_attention.py, RT-2 bf16 / FP8 (16 / 32 / 64 keys a step).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s24call2; rm -rf $R; mkdir -p $R
pack() { echo "$1 rc $2" >> $R/steps.txt; tar czf $OUT/call2.tgz -C $R . ; cp $R/steps.txt $OUT/; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_decode_gemv.py tests/test_token_tools.py -k "qkv_rope or (qkv and attention)" > $R/tests.log 2>&1; pack tests $?
for p in "" --fp8; do
  OUT=$R timeout 80 python3 benchmarks/micro_decode_attention.py --model openvla $p --block-n 16,32,64,16+p,32+p >> $R/micro.log 2>&1; echo "rc $?" >> $R/micro.log
done; pack micro_openvla $?
OUT=$R/ab ITERS=30 BUILDS="new opt fp8 optfp8" OPT_OPTIONS=decode_attention=in_qkv GROUPS_TO_BENCH="token" ROUNDS="1 2" VERIFY= SKIP_TESTS=1 BUDGET=190 timeout 200 bash benchmarks/gpu_triton_check.sh final > $R/ab.log 2>&1; pack ab $?
cp $R/ab/summary.txt $OUT/ 2>/dev/null
timeout 35 python3 -m cortexflow.cli verify --model openvla --backend triton --size real --triton-options decode_attention=in_qkv --json $R/verify_openvla_in_qkv.json > $R/verify.log 2>&1; pack verify $?
timeout 35 python3 -m cortexflow.cli verify --model openvla --backend triton --size real --precision fp8 --triton-options decode_attention=in_qkv --json $R/verify_openvla_fp8_in_qkv.json >> $R/verify.log 2>&1; pack verify_fp8 $?
for p in "" --fp8; do
  OUT=$R timeout 45 python3 benchmarks/micro_decode_attention.py --model rt2 $p --block-n 16,32,64 >> $R/micro_rt2.log 2>&1; echo "rc $?" >> $R/micro_rt2.log
done; pack micro_rt2 $?
