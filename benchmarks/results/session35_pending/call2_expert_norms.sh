# Device call written in session 35 (~5 min on an H100): the step kernel's folded norms (ExpertTiling.norm_rows,
# TritonOptions.expert_norms), its first GPU run:
# (1) the GPU tests of the folded norms (tile counters and sums of squares across many programs);
# (2) micro_expert_layer.py --step --euler: the Euler step kernel at the default tiling vs "norms folded";
# (3) Pi0 at 2 views, two interleaved rounds of 100 calls, expert_norms=phase (the default) vs folded.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R/micro $R/ab
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $R/machine.txt
cat $R/machine.txt
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_expert_norm_rows.py \
  > $R/tests.log 2>&1; echo "tests rc $?" >> $R/steps.txt
tail -3 $R/tests.log
OUT=$R/micro timeout 110 python3 benchmarks/micro_expert_layer.py --step --euler --no-phases --only "norms folded" \
  > $R/micro/micro.log 2>&1; echo "micro rc $?" >> $R/steps.txt
grep -E "step kernel|chain" $R/micro/micro.log | grep -v "^ " | head
for r in 1 2; do for v in phase folded; do
  [ $r = 2 ] && v=$([ $v = phase ] && echo folded || echo phase)
  timeout 55 python3 -m cortexflow.cli bench --backends triton --graphs on --iters 100 --warmup 5 --device cuda \
    --size real --models pi0 --views 2 --triton-options expert_norms=$v --json $R/ab/bench_${v}_r$r.json \
    > $R/ab/bench_${v}_r$r.log 2>&1; echo "ab $v r$r rc $?" >> $R/steps.txt
  grep -E "pi0 .*median" $R/ab/bench_${v}_r$r.log; done; done
cd $OUT && tar czf results.tgz r && cp r/steps.txt . && cp r/micro/micro_expert_layer.json micro.json 2>/dev/null; cat steps.txt
