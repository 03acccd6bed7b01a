# Pending device call, written in session 36 after its device time was spent (~2 min on an H100; nothing to carry).
# Session 36's micro put the Euler step kernel 5.1 us a layer above the layers-only step kernel (48.75 against 43.62),
# session 33's profile of the whole predict only ~2.4 above; the micro then never reset x_t between replays.
# 1. micro_expert_layer.py --step --euler (now restoring x_t before each step): the layers-only step kernel and the
#    Euler step kernel, bf16 and the backend's FP8 tiling, in one process;
# 2. `cortexflow profile` of Pi0 at 2 views (no graph): the Euler step kernel's time a step inside the predict, on
#    the same machine.
# If the micro's Euler launch now sits ~2.4 us a layer above the layers (as in the predict), the 5 us were the
# drifting x_t; if it stays ~5 us above while the profile shows ~2.4, the difference is between the two settings.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
S=$(mktemp -d)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } > $OUT/steps.txt
OUT=$S timeout 150 python3 benchmarks/micro_expert_layer.py --step --euler --fp8 --no-phases --only "bits, weights first" \
  > $OUT/micro.log 2>&1; echo "micro rc $?" >> $OUT/steps.txt
cp $S/micro_expert_layer.json $OUT/micro_euler.json
timeout 150 python3 -m cortexflow.cli profile --model pi0 --backend triton --views 2 --size real > $OUT/profile_pi0.txt 2>&1
echo "profile rc $?" >> $OUT/steps.txt
grep -E "^(step kernel|Euler)" $OUT/micro.log | grep -v "("; grep -iE "expert_step|denois" $OUT/profile_pi0.txt | head; cat $OUT/steps.txt
