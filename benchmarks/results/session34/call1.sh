# Session 34, call 1 (~6 min): Pi0's vision and prefix GEMM shapes in cuBLAS against a Triton tiling / split-K sweep
# (micro_gemm_shapes.py); the first GPU run of micro_expert_layer.py --step --euler (bf16 and the FP8 default).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R/gemm $R/micro_euler
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $R/machine.txt
cat $R/machine.txt
OUT=$R/gemm timeout 250 python3 benchmarks/micro_gemm_shapes.py > $R/gemm/gemm.log 2>&1; echo "gemm rc $?" >> $R/steps.txt
cp $R/gemm/gemm.log $OUT/gemm.log; cp $R/gemm/micro_gemm_shapes.json $OUT/ 2>/dev/null
OUT=$R/micro_euler timeout 110 python3 benchmarks/micro_expert_layer.py --step --euler --fp8 --no-phases \
  --only "bits, weights first" > $R/micro_euler/micro.log 2>&1; echo "micro euler rc $?" >> $R/steps.txt
grep -E "step kernel|layer" $R/micro_euler/micro.log | tail -12
cd $OUT && tar czf results.tgz r && cp r/steps.txt . && cp r/micro_euler/micro.log micro_euler.log; cat steps.txt
