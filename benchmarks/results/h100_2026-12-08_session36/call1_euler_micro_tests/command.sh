# Pending device call, written in session 33 after its budget was spent (~8 min on an H100; carry old_build.tar =
# `git archive 31f42c6` for step 3):
# 1. micro_expert_layer.py --step --euler (first GPU run of the mode): the Euler step kernel the backend launches, bf16
#    and FP8 default tilings, against the layers-only step kernel of the same build.
# 2. The expert's FP8 GPU tests (session 32's call 1 ran 33 of them before its time limit).
# 3. Session 32's bf16 load-order A/B (old = 31f42c6, the weight tiles loaded before the rows' tile) on a machine
#    quiet enough: Pi0 1/2/3 views, two interleaved rounds; session 33's call B drowned in a 5-10 % spread.
# Every log goes straight to $OUT (at most 8 files come back), so a run cut off at its limit keeps what it wrote.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
S=$(mktemp -d); mkdir -p $S/micro $S/micro_euler $S/grid
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } > $OUT/steps.txt
OUT=$S/micro timeout 100 python3 benchmarks/micro_expert_layer.py --step --fp8 --no-phases --only "bits, weights first" \
  > $OUT/micro.log 2>&1; echo "micro rc $?" >> $OUT/steps.txt
OUT=$S/micro_euler timeout 100 python3 benchmarks/micro_expert_layer.py --step --euler --fp8 --no-phases --only "bits, weights first" \
  > $OUT/micro_euler.log 2>&1; echo "micro euler rc $?" >> $OUT/steps.txt
cp $S/micro_euler/micro_expert_layer.json $OUT/micro_euler.json
grep -hE "step kernel" $OUT/micro.log $OUT/micro_euler.log | grep -v "^ " | head
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_e4m3.py tests/test_expert_layer.py tests/test_expert_step.py \
  -k "fp8 or f16 or float16 or e4m3 or bits or code or weights" > $OUT/tests.log 2>&1; echo "tests rc $?" >> $OUT/steps.txt
tail -2 $OUT/tests.log
OUT=$S/grid BUDGET=200 BUILDS="old new" GROUPS_TO_BENCH="pi0" VERIFY="" ROUNDS="1 2" SKIP_TESTS=1 \
  bash benchmarks/gpu_triton_check.sh final old_build.tar > $OUT/grid.log 2>&1; echo "grid rc $?" >> $OUT/steps.txt
cp $S/grid/summary.txt $OUT/grid_summary.txt; cp $S/grid/results.tgz $OUT/grid_results.tgz
cat $OUT/steps.txt $OUT/grid_summary.txt
