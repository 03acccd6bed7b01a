# Device call 2 of session 31 (build 4e25349): the FP8 expert with float16 operand rows (ExpertTiling.fp8_operands="f16")
# against the default, one-layer and step kernel, bf16 and E4M3 weights; then the FP8 weight cache's tests on the GPU.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $OUT/machine.txt
mkdir -p $OUT/micro; OUT=$OUT/micro timeout 110 python3 benchmarks/micro_expert_layer.py --fp8 --step --no-phases --only "f16 operands" > $OUT/micro/micro.log 2>&1; grep -E "^(persistent|step kernel)" $OUT/micro/micro.log
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_cache.py > $OUT/tests.log 2>&1; tail -2 $OUT/tests.log
