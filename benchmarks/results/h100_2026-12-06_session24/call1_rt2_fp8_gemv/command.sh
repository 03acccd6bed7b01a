# device call 1 of session 24 (build = commit bf5aefb): the FP8 decode GEMV tilings at RT-2's shapes
# (Gemma-2B, width 2048), which were tuned only at OpenVLA's (width 4096). The default FP8 tilings of QKV/RoPE and o
# read K in 2048-wide chunks, so at RT-2's K 2048 each program is one chunk with nothing to pipeline. Prediction: a
# narrower K chunk is faster for QKV/RoPE and o; gate/up (1024-wide chunks) and down (K 16384) near their defaults.
# Weights cycled past L2. Written in session 23, never ran there
# (no device time left); all four decode projections and QKV/RoPE, ~5 min.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s24call1; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 300 python3 benchmarks/bench_fp8_decode.py --model rt2 --skip prefill --out $R/rt2_fp8_decode.json > $R/rt2_fp8_decode.log 2>&1; echo "rc $?" >> $R/rt2_fp8_decode.log
cp $R/* $OUT/
