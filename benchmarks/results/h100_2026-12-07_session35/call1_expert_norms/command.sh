# Device call 1 of session 35 (H100, fresh start, 227 s; written as session35_pending/call2_expert_norms.sh at a2b75aa):
# TritonOptions.expert_norms), its first GPU run:
# (1) the GPU tests of the folded norms (tile counters and sums of squares across many programs);
# (2) micro_expert_layer.py --step --euler: the Euler step kernel at the default tiling vs "norms folded";
# (3) Pi0 at 2 views, two interleaved rounds of 100 calls, expert_norms=phase (the default) vs folded.
# Every result is written straight into $OUT (8 files at most), so a run cut off by its time limit keeps what it did.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } > $OUT/steps.txt
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_expert_norm_rows.py > $OUT/tests.log 2>&1
echo "tests rc $?" >> $OUT/steps.txt; tail -3 $OUT/tests.log
mkdir -p /tmp/micro
OUT=/tmp/micro timeout 110 python3 benchmarks/micro_expert_layer.py --step --euler --no-phases --only "norms folded" \
  > $OUT/micro.log 2>&1; echo "micro rc $?" >> $OUT/steps.txt; cp /tmp/micro/micro_expert_layer.json $OUT/micro.json
grep -E "step kernel|chain" $OUT/micro.log | grep -v "^ " | head
for r in 1 2; do for v in phase folded; do
  [ $r = 2 ] && v=$([ $v = phase ] && echo folded || echo phase)
  timeout 55 python3 -m cortexflow.cli bench --backends triton --graphs on --iters 100 --warmup 5 --device cuda \
    --size real --models pi0 --views 2 --triton-options expert_norms=$v --json $OUT/bench_${v}_r$r.json \
    > /tmp/bench_${v}_r$r.log 2>&1; echo "ab $v r$r rc $?" >> $OUT/steps.txt
  grep -E "pi0 .*median" /tmp/bench_${v}_r$r.log | tee -a $OUT/steps.txt; done; done
cat $OUT/steps.txt
