# Device call 4 of session 29. new build = 9109fec (the grid barrier polls with volatile loads, then one acquire read);
# old_build.tar = `git archive dfd715e` (code of 8b1f8d7: the step kernel polls with acquire loads). The device copy's git
# HEAD is stale. Prediction: per barrier ~0.1-0.2 us less (no CTA barriers or L1 invalidation per poll; the step kernel
# has ~110 barriers a step), so Pi0 2 views -0.1 to -0.25 ms (-0.7 to -1.6 %), the expert_launch=layer path (ACQUIRE off)
# unchanged. Steps: (1) the step kernel's GPU tests (real grids, so the barrier waits); (2) old / new interleaved, two
# rounds of 100 calls, Pi0 1/2/3 views, Pi0.5 prompt 20/60, verify Pi0 / Pi0.5 at real size; (3) a profile of new.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s29c4; rm -rf $R; mkdir -p $R
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > $R/machine.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_expert_step.py tests/test_expert_layer.py > $R/tests.log 2>&1
echo "tests rc $?" >> $R/steps.txt; tail -3 $R/tests.log
OUT=$R/ab ITERS=100 BUILDS="old new" GROUPS_TO_BENCH="pi0 pi05" ROUNDS="1 2" VERIFY="pi0 pi05" SKIP_TESTS=1 BUDGET=300 \
  timeout 320 bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1
echo "ab rc $?" >> $R/steps.txt
cp $R/ab/summary.txt $R/ab/summary.json $OUT/ 2>/dev/null; tail -12 $R/ab.log
timeout 60 python3 -m cortexflow.cli profile --model pi0 --backend triton --views 2 --size real --device cuda \
  --json $R/profile_pi0.json > $R/profile.log 2>&1
echo "profile rc $?" >> $R/steps.txt
cp $R/steps.txt $R/machine.txt $R/tests.log $R/profile_pi0.json $R/profile.log $OUT/ 2>/dev/null
cp $R/ab/results.tgz $OUT/ 2>/dev/null; cat $R/steps.txt
