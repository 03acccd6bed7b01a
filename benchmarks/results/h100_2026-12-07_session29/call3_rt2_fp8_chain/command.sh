# Device call 3 of session 29: session 24's unrun chained sweep of RT-2's FP8 decode tilings
# (h100_2026-12-06_session24/call4_rt2_fp8_chain/command.sh) on build 8b1f8d7.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s24call4; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> $R/machine.txt
OUT=$R timeout 250 python3 benchmarks/micro_decode_chain.py --model rt2 --fp8 --schedules --projections o,qkv,down > $R/chain.log 2>&1; echo "rc $?" >> $R/chain.log
cp $R/* $OUT/; tail -40 $R/chain.log
