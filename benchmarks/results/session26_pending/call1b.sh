# Device call of session 26 (new build = the commit adding this file; the device copy's git HEAD is stale).
# A leaner call 1 (call1.sh never got a machine for long enough; by then ~590 s of device time were left, so "step"
# is left out of the bench). expert_launch="euler": a whole Euler step of
# Pi0 / Pi0.5 in one launch (the step kernel with the action path: action tokens, 18 expert layers, final norm,
# action head, x_t update) against "layer" (the default; "new") and "step" (the expert layers in one launch, the
# action path as ~7 kernels a step around it; "opt2"); "opt" = euler.
# Prediction: the ~7 kernels a step around the expert (~35-40 us a step of kernels and gaps) become 2 phases and 2
# barriers in the launch (~12-17 us): Pi0 / Pi0.5 2 views -0.2 to -0.25 ms against "step" (-1.5 %).
# Steps pack OUT/call.tgz, most needed first: (1) verify Pi0 with euler at real size; (2) new / opt, two interleaved
# rounds, Pi0 and Pi0.5 at 2 views, prompt 20, 30 calls each; (3) the Euler-step GPU tests (8 programs: both barrier
# layouts, the engine with euler).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s26call; rm -rf $R; mkdir -p $R/ab
pack() { echo "$1 rc $2 $(date +%T)" >> $R/steps.txt; tar czf $OUT/call.tgz -C $R . ; cp $R/steps.txt $OUT/; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > $R/machine.txt
timeout 90 python3 -m cortexflow.cli verify --model pi0 --backend triton --size real --device cuda \
  --triton-options expert_launch=euler --json $R/ab/verify_pi0_euler.json > $R/verify_pi0.log 2>&1
pack verify $?
bench() {  # bench BUILD ROUND OPTIONS
  timeout 100 python3 -m cortexflow.cli bench --backends triton --graphs on --iters 30 --warmup 5 --device cuda \
    --size real --models pi0,pi05 --views 2 --prompt-len 20 --triton-options "$3" \
    --json $R/ab/bench_pi0family_$1_r$2.json > $R/bench_$1_r$2.log 2>&1
  pack bench_$1_r$2 $?
}
bench new 1 expert_launch=layer; bench opt 1 expert_launch=euler
bench opt 2 expert_launch=euler; bench new 2 expert_launch=layer
python3 benchmarks/ab_summary.py $R/ab $R/ab > $R/summary.txt 2>&1; pack summary $?
cp $R/summary.txt $OUT/
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_expert_step.py -k "euler" > $R/tests.log 2>&1
pack tests $?
cp $R/summary.txt $OUT/
