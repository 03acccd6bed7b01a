# Session 34, call 1 (~5 min): (1) SigLIP's four GEMM shapes at 2 views in cuBLAS against a Triton tiling / split-K
# sweep (micro_gemm_shapes.py; cuBLAS alone for every Pi0 vision/prefix shape at 1/2/3 views), the fastest tiling of
# each shape that beats cuBLAS by 3 % written to tilings.json; (2) Pi0 1/2/3 views with vision_gemm=triton on those
# tilings against the default, one round of 50 calls each (the device budget left); (3) the GEMM's GPU tests.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R/gemm $R/ab
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $R/machine.txt
cat $R/machine.txt
OUT=$R/gemm timeout 130 python3 benchmarks/micro_gemm_shapes.py --only v_qkv,v_o,v_fc1,v_fc2 --cublas-views 1,2,3 \
  --tilings-out $R/tilings.json > $R/gemm/gemm.log 2>&1; echo "gemm rc $?" >> $R/steps.txt
cp $R/gemm/gemm.log $OUT/gemm.log; cat $R/tilings.json
if [ -s $R/tilings.json ] && [ "$(cat $R/tilings.json)" != "{}" ]; then
  for r in 1; do for v in cublas triton; do
    timeout 55 python3 benchmarks/with_vision_tilings.py $R/tilings.json bench --backends triton --graphs on --iters 50 \
      --warmup 5 --device cuda --size real --models pi0 --views 1,2,3 --triton-options vision_gemm=$v \
      --json $R/ab/bench_${v}_r$r.json > $R/ab/bench_${v}_r$r.log 2>&1; echo "ab $v r$r rc $?" >> $R/steps.txt
    grep -E "^ +pi0" $R/ab/bench_${v}_r$r.log; done; done
fi
timeout 30 python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py > $R/tests.log 2>&1; echo "tests rc $?" >> $R/steps.txt
tail -2 $R/tests.log
cd $OUT && tar czf results.tgz r && cp r/steps.txt . && cp r/tilings.json . 2>/dev/null; cat steps.txt
