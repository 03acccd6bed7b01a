# Device call D of session 33 (~3 min warm): the whole predict with the expert tiling that call C's micro-benchmark
# found fastest (row_vectors_early with idle_prefetch qkv+o+down: 41.24 against 43.24 us a layer, twice) against the
# default, Pi0 1/2/3 views, bf16, two interleaved rounds of 100 calls (cortexflow bench with the backend's tiling
# replaced in-process; the prefetch and the early loads change no bit: the GPU tests of call C).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
cat > /tmp/bench_tiling.py <<'PY'
import sys
from dataclasses import replace
import cortexflow.backends.triton_decoder as td
if sys.argv[1] == "combo":
    base = td.default_tiling
    td.default_tiling = lambda fp8=False: replace(base(fp8), row_vectors_early=True, idle_prefetch=11)
from cortexflow.cli import app
sys.argv = ["cortexflow", *sys.argv[2:]]
app()
PY
for round in 1 2; do
  for v in default combo; do
    [ $round = 2 ] && v=$([ $v = default ] && echo combo || echo default)
    timeout 80 python3 /tmp/bench_tiling.py $v bench --backends triton --graphs on --iters 100 --warmup 5 --device cuda \
      --size real --models pi0 --views 1,2,3 --prompt-len 20 --json $OUT/bench_${v}_r$round.json > $OUT/bench_${v}_r$round.log 2>&1
    echo "$v r$round rc $?"; grep -E "^ +pi0" $OUT/bench_${v}_r$round.log
  done
done
