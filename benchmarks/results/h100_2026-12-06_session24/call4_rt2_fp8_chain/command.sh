# device call 4 of session 24 (build = the commit adding this file; the device copy's git HEAD is stale): RT-2's FP8
# decode tilings in the chained decode (micro_decode_chain.py --model rt2: 18 layers in one CUDA graph with PDL, the
# K-group 16 schedules with and without prefetch), coordinate descent over o, QKV/RoPE and down from the new defaults.
# Call 3's whole-predict gain (−8.9 %) was three times what the isolated kernels predicted, so the chain may rank
# tilings differently. What the device time allows (~4 min); the JSON is written after each projection.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s24call4; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
OUT=$R timeout 250 python3 benchmarks/micro_decode_chain.py --model rt2 --fp8 --schedules --projections o,qkv,down > $R/chain.log 2>&1; echo "rc $?" >> $R/chain.log
cp $R/* $OUT/
