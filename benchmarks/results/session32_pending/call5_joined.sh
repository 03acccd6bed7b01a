# Pending device call, written in session 32 after its device budget was spent (~5 min on an H100):
# 1. micro_expert_layer.py --fp8 --step: the FP8 default (f16 operands, bits, weights first) against the same with
#    joined tiles (ExpertTiling.fp8_joined_tiles) and the bf16 kernel.
# 2. The expert GPU tests with the FP8 forms (session 32's call 1 ran 33 of them before its 170 s limit).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $OUT/machine.txt
mkdir -p $OUT/micro; OUT=$OUT/micro timeout 120 python3 benchmarks/micro_expert_layer.py --fp8 --step --no-phases \
  --only "weights first" > $OUT/micro/micro.log 2>&1; grep -E "^(persistent|step kernel)" $OUT/micro/micro.log
timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_e4m3.py tests/test_expert_layer.py tests/test_expert_step.py \
  -k "fp8 or f16 or float16 or e4m3 or bits or code or weights or joined" > $OUT/tests.log 2>&1; tail -4 $OUT/tests.log
