# Device call 1 of session 30 (build 5336863): the attention merge phase and value-column parts of the expert
# layer. GPU tests of the new paths (8 programs, real size), then the one-layer and step kernels at each new
# tiling, then the attention phase alone for three of them.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $OUT/machine.txt
timeout 150 python3 -m pytest -q -x tests/test_expert_layer.py tests/test_expert_step.py -k "merge or real_size or equals" > $OUT/tests.log 2>&1; tail -3 $OUT/tests.log
mkdir -p $OUT/sweep $OUT/phases
OUT=$OUT/sweep timeout 260 python3 benchmarks/micro_expert_layer.py --only "attention merge phase" --step --no-phases > $OUT/sweep/micro.log 2>&1
grep -E "^(persistent|step kernel|kernel chain)" $OUT/sweep/micro.log
OUT=$OUT/phases timeout 150 python3 benchmarks/micro_expert_layer.py --quick --phases-of "attention merge phase" --phases-of "attention merge phase, 64 rows, 2 value parts" --phases-of "attention merge phase, 64 rows, 4 value parts" --phase attention --phase barriers > $OUT/phases/micro.log 2>&1
grep "^phase" $OUT/phases/micro.log
