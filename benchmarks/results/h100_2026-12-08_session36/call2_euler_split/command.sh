# Session 36, call 2 (~4 min on an H100): the Euler step in three launches (expert_step(split_ends=True),
# TritonOptions.expert_launch="euler_split") against the one launch.
# Call 1 measured the Euler step kernel at 48.33 us a layer and the layers-only step kernel at 43.40 (two processes):
# 89 us a step more, where the action path's own work is a few us.
# 1. micro_expert_layer.py --step --euler: the layers-only step kernel, the Euler step in one launch and in three,
#    bf16, in one process.
# 2. Whole predict: this build with expert_launch=euler (new) and euler_split (opt), Pi0 1/2/3 views
#    (Pi0.5 left out for the device time left), two interleaved rounds (grid.log streams each case's line).
# 3. The GPU tests of the split (bit-equal to the one launch; the backend's actions against the PyTorch backend).
# Every log goes straight to $OUT (at most 8 files come back).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
S=$(mktemp -d); mkdir -p $S/micro $S/grid
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } > $OUT/steps.txt
OUT=$S/micro timeout 90 python3 benchmarks/micro_expert_layer.py --step --euler --no-phases --only "bits, weights first" \
  > $OUT/micro.log 2>&1; echo "micro rc $?" >> $OUT/steps.txt
cp $S/micro/micro_expert_layer.json $OUT/micro_euler_split.json
grep -E "^(step kernel|Euler)" $OUT/micro.log | grep -v "("
OUT=$S/grid BUDGET=150 BUILDS="new opt" OPT_OPTIONS="expert_launch=euler_split" GROUPS_TO_BENCH="pi0" VERIFY="" \
  ROUNDS="1 2" SKIP_TESTS=1 bash benchmarks/gpu_triton_check.sh final > $OUT/grid.log 2>&1; echo "grid rc $?" >> $OUT/steps.txt
cp $S/grid/summary.txt $OUT/grid_summary.txt; cp $S/grid/results.tgz $OUT/grid_results.tgz
cat $OUT/grid_summary.txt
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_expert_step.py -k "split" > $OUT/tests.log 2>&1
echo "tests rc $?" >> $OUT/steps.txt; tail -2 $OUT/tests.log; cat $OUT/steps.txt
