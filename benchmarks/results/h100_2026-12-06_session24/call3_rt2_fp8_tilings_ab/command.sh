# device call 3 of session 24 (new build = the commit adding this file; old = old_build.tar = bf5aefb, this session's
# start; the device copy's git HEAD is stale). RT-2's own FP8 decode tilings from call 1's sweep (o 4 rows, 2048, 4
# warps; down 8 rows, 2048, 8 warps, prefetch; QKV/RoPE 2 pairs, 1024, 4 warps; weights narrower than WIDE_MODEL).
# Prediction from the isolated kernels: −1.9 µs a layer-token, 18 layers x 120 tokens: −4 ms (−3 %) on RT-2 FP8;
# OpenVLA (width 4096) and every bf16 path unchanged. Steps pack OUT/call3.tgz:
# (1) GPU tests of the FP8 decode kernels and the FP8 token decoder;
# (2) oldfp8 / fp8 (and old / new as the control), token VLAs, two interleaved rounds of 30 calls; verify RT-2 fp8.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s24call3; rm -rf $R; mkdir -p $R
pack() { echo "$1 rc $2" >> $R/steps.txt; tar czf $OUT/call3.tgz -C $R . ; cp $R/steps.txt $OUT/; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_decode_gemv.py tests/test_fp8_token_decoder.py -k "fp8 or tiling" > $R/tests.log 2>&1; pack tests $?
OUT=$R/ab ITERS=30 BUILDS="oldfp8 fp8 old new" GROUPS_TO_BENCH="token" ROUNDS="1 2" VERIFY= VERIFY_FP8=rt2 SKIP_TESTS=1 BUDGET=300 timeout 310 bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1; pack ab $?
cp $R/ab/summary.txt $OUT/ 2>/dev/null
