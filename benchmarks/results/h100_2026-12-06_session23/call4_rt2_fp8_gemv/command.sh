# device call 4 of session 23 (build = commit 80598af): the FP8 decode GEMV tilings at RT-2's shapes
# (Gemma-2B, width 2048), which were tuned only at OpenVLA's (width 4096). The default FP8 tiling reads K in chunks of
# 2048, so RT-2's gate/up (K 2048) is one chunk a program. Prediction: a narrower K chunk or more rows a program is
# faster for gate/up and QKV at K 2048; down (K 16384) near the default. Weights cycled past L2. Never ran in session 23
# (no device time left); all four decode projections and QKV/RoPE, ~5 min.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s23call4; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 300 python3 benchmarks/bench_fp8_decode.py --model rt2 --skip prefill --out $R/rt2_fp8_decode.json > $R/rt2_fp8_decode.log 2>&1; echo "rc $?" >> $R/rt2_fp8_decode.log
cp $R/* $OUT/
