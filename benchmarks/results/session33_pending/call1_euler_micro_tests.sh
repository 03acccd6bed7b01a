# Pending device call, written in session 33 after its budget was spent (~8 min on an H100; carry old_build.tar =
# `git archive 31f42c6` for step 3):
# 1. micro_expert_layer.py --step --euler (first GPU run of the mode): the Euler step kernel the backend launches, bf16
#    and FP8 default tilings, against the layers-only step kernel of the same build.
# 2. The expert's FP8 GPU tests (session 32's call 1 ran 33 of them before its time limit).
# 3. Session 32's bf16 load-order A/B (old = 31f42c6, the weight tiles loaded before the rows' tile) on a machine
#    quiet enough: Pi0 1/2/3 views, two interleaved rounds; session 33's call B drowned in a 5-10 % spread.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R/micro $R/micro_euler $R/grid
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $R/machine.txt
OUT=$R/micro timeout 100 python3 benchmarks/micro_expert_layer.py --step --fp8 --no-phases --only "bits, weights first" \
  > $R/micro/micro.log 2>&1; echo "micro rc $?" >> $R/steps.txt
OUT=$R/micro_euler timeout 100 python3 benchmarks/micro_expert_layer.py --step --euler --fp8 --no-phases --only "bits, weights first" \
  > $R/micro_euler/micro.log 2>&1; echo "micro euler rc $?" >> $R/steps.txt
grep -hE "step kernel" $R/micro/micro.log $R/micro_euler/micro.log | grep -v "^ " | head
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_e4m3.py tests/test_expert_layer.py tests/test_expert_step.py \
  -k "fp8 or f16 or float16 or e4m3 or bits or code or weights" > $R/tests.log 2>&1; echo "tests rc $?" >> $R/steps.txt
tail -2 $R/tests.log
OUT=$R/grid BUDGET=200 BUILDS="old new" GROUPS_TO_BENCH="pi0" VERIFY="" ROUNDS="1 2" SKIP_TESTS=1 \
  bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/grid.log 2>&1; echo "grid rc $?" >> $R/steps.txt
tail -5 $R/grid/summary.txt
# At most a few files come back from the device: everything in results.tgz, the summaries beside it.
cd $OUT && tar czf results.tgz r && cp r/steps.txt . && cp r/grid/summary.txt grid_summary.txt; \
  cp r/micro_euler/micro_expert_layer.json micro_euler.json; cat steps.txt
