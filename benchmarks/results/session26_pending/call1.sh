# Device call 1 of session 26 (new build = the commit adding this file; the device copy's git HEAD is stale).
# expert_launch="euler": a whole Euler step of Pi0 / Pi0.5 in one launch (the step kernel with the action path:
# action tokens, 18 expert layers, final norm, action head, x_t update), against "layer" (the default) and "step"
# (the expert layers in one launch, the action path as ~7 torch / Triton kernels a step around it).
# Prediction: the ~7 kernels a step around the expert (~40-55 us a step of kernels and gaps) become 2 phases and 2
# barriers inside the launch (~6-8 us): Pi0 / Pi0.5 -0.3 to -0.5 ms against "step" (-2 to -3 %).
# Steps pack OUT/call1.tgz: (1) the Euler-step GPU tests (8 programs, both barrier layouts); (2) real-size verify of
# Pi0 and Pi0.5 with euler; (3) round 1 of bench: new (layer) / opt2 (step) / opt (euler), Pi0 1-3 views, Pi0.5
# prompts 20 and 60, 30 calls each.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s26call1; rm -rf $R; mkdir -p $R/ab
pack() { echo "$1 rc $2 $(date +%T)" >> $R/steps.txt; tar czf $OUT/call1.tgz -C $R . ; cp $R/steps.txt $OUT/; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_expert_step.py -k "euler" > $R/tests.log 2>&1
pack tests $?
for m in pi0 pi05; do
  timeout 100 python3 -m cortexflow.cli verify --model $m --backend triton --size real --device cuda \
    --triton-options expert_launch=euler --json $R/ab/verify_${m}_euler.json > $R/verify_$m.log 2>&1
  pack verify_$m $?
done
OUT=$R/ab ITERS=30 BUILDS="new opt2 opt" OPT_OPTIONS="expert_launch=euler" OPT2_OPTIONS="expert_launch=step" \
  GROUPS_TO_BENCH="pi0 pi05" ROUNDS="1" VERIFY= SKIP_TESTS=1 BUDGET=300 timeout 310 \
  bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1
pack ab $?
cp $R/ab/summary.txt $OUT/ 2>/dev/null
