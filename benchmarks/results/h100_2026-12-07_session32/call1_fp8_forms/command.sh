# Session 32, call 1 (this tree): the FP8 expert's GEMM forms.
# 1. GPU tests: the FP8 / f16 expert layer and step kernels (the new default fp8_operands="f16", the prefetch and
#    weights-first forms), the E4M3 -> bf16 conversion by bits.
# 2. micro_expert_layer.py --fp8 --step: one-layer and step kernels, bf16 and E4M3 weights, every FP8 variant.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $OUT/machine.txt
cat $OUT/machine.txt
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_e4m3.py tests/test_expert_layer.py tests/test_expert_step.py \
  -k "fp8 or f16 or float16 or e4m3 or bits or code or weights" > $OUT/tests.log 2>&1; tail -4 $OUT/tests.log
mkdir -p $OUT/micro; OUT=$OUT/micro timeout 330 python3 benchmarks/micro_expert_layer.py --fp8 --step --no-phases \
  --only "fp8" > $OUT/micro/micro.log 2>&1; grep -E "^(persistent|step kernel)" $OUT/micro/micro.log
