# device call 2 of session 24 (build = the commit adding this file; the device copy's git HEAD is stale). The decode
# step's attention in the QKV/RoPE GEMV's last-arriving program of each KV head (TritonOptions.decode_attention=in_qkv)
# against its own launch (default "launch"). Prediction (OpenVLA): the attention + combine launches cost ~9 µs a
# layer-step (2.8 ms a call with the prefill's); in the GEMV's tail the first KV heads' attention hides behind the
# later heads' weight stream and only the last groups' (~3 µs) shows: −4 to −6 µs a layer-step, −0.8 to −1.2 ms on
# OpenVLA in bf16 and FP8. RT-2 (one KV head: one program attends for all 8 query heads at the very end): slower.
# Each step packs OUT/call2.tgz:
# (1) GPU tests of the kernel and of the Triton backend with the option (PDL on where the test asks for it);
# (2) micro_decode_attention.py: OpenVLA / RT-2, bf16 / FP8, launch vs in_qkv at 16 / 32 / 64 keys a step and 16 / 32
#     with key prefetch, 2 rounds. The whole-predict A/B follows in call 3 with the tail's tiling chosen from this.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s24call2; rm -rf $R; mkdir -p $R
pack() { echo "$1 rc $2" >> $R/steps.txt; tar czf $OUT/call2.tgz -C $R . ; cp $R/steps.txt $OUT/; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_decode_gemv.py tests/test_token_tools.py -k "qkv_rope or (qkv and attention)" > $R/tests.log 2>&1; pack tests $?
for m in openvla rt2; do for p in "" --fp8; do
  B=16,32,64,16+p,32+p; [ $m = rt2 ] && B=16,32,64  # key prefetch: one query head per KV head only
  OUT=$R timeout 100 python3 benchmarks/micro_decode_attention.py --model $m $p --block-n $B >> $R/micro.log 2>&1; echo "rc $?" >> $R/micro.log
done; done; pack micro $?
