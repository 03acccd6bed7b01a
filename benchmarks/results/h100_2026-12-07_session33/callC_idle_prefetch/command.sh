# Device call C of session 33 (~8 min on an H100): the idle programs' L2 prefetch (ExpertTiling.idle_prefetch,
# TritonOptions.expert_prefetch), built after call A's profile of the step kernel (35 % of its warp samples wait at
# grid barriers; the QKV phase's 52 and the row phases' 81 programs without an item wait through the phase).
# 1. micro_expert_layer.py --step --only "idle prefetch" --only "row vectors": each prefetch mask, and the row phases'
#    column vectors loaded first (ExpertTiling.row_vectors_early), against the default, one-layer and step kernel.
# 2. The best mask's whole predict against the default: Pi0 1/2/3 views, two interleaved rounds of 100 calls
#    (gpu_triton_check.sh final with BUILDS="new opt", OPT_OPTIONS=expert_prefetch=BEST), no verify (the prefetch
#    changes no bit: tests/test_expert_layer.py::test_the_idle_prefetch_changes_no_bit runs first).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R/micro $R/grid
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $R/machine.txt
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_expert_layer.py -k "idle_prefetch or early" > $R/tests.log 2>&1
echo "bit-equality test rc $?" >> $R/steps.txt; tail -1 $R/tests.log
OUT=$R/micro timeout 230 python3 benchmarks/micro_expert_layer.py --step --no-phases --only "idle prefetch" --only "row vectors" \
  > $R/micro/micro.log 2>&1; echo "micro rc $?" >> $R/steps.txt
grep -E "^(persistent|step kernel|kernel chain)" $R/micro/micro.log
BEST=$(python3 - "$R/micro/micro_expert_layer.json" <<'PY'
import json, sys
names = {"idle prefetch qkv": "qkv", "idle prefetch qkv, down": "qkv+down", "idle prefetch qkv, o, down": "qkv+o+down",
         "idle prefetch all": "all", "idle prefetch o, gate/up": "o+gate_up"}
rows = {r["variant"]: r["us_per_layer"] for r in json.load(open(sys.argv[1]))["rows"]}
step = {n: rows.get(f"step kernel: {n}") for n in names}
best = min((v, n) for n, v in step.items() if v is not None)
print(names[best[1]])
PY
)
echo "best mask: $BEST" | tee -a $R/steps.txt
OUT=$R/grid BUDGET=200 BUILDS="new opt" OPT_OPTIONS="expert_prefetch=$BEST" GROUPS_TO_BENCH="pi0" VERIFY="" \
  ROUNDS="1 2" SKIP_TESTS=1 bash benchmarks/gpu_triton_check.sh final > $R/grid.log 2>&1; echo "grid rc $?" >> $R/steps.txt
tail -6 $R/grid/summary.txt; cat $R/steps.txt
# 3. Session 32's joined FP8 tiles (call A's micro run stopped at its limit before them): the FP8 default against
#    the same with ExpertTiling.fp8_joined_tiles, step kernel.
mkdir -p $R/joined; OUT=$R/joined timeout 140 python3 benchmarks/micro_expert_layer.py --fp8 --step --no-phases \
  --only "bits, weights first" > $R/joined/micro.log 2>&1; echo "joined micro rc $?" >> $R/steps.txt
grep -E "^step kernel" $R/joined/micro.log; tail -1 $R/steps.txt
# At most a few files come back from the device: everything in results.tgz, the summaries beside it.
cd $OUT && tar czf results.tgz r && cp r/steps.txt r/micro/micro_expert_layer.json . && \
  cp r/grid/summary.txt grid_summary.txt; cp r/grid/summary.json grid_summary.json; \
  cp r/joined/micro_expert_layer.json micro_joined.json 2>/dev/null; ls $OUT
