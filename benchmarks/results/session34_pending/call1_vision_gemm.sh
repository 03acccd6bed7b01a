# Pending device call, written in session 34 (no device was lent; ~8 min on an H100):
# (1) SigLIP's four GEMM shapes at 2 views in cuBLAS against a Triton tiling / split-K sweep (micro_gemm_shapes.py;
#     cuBLAS alone for every Pi0 vision/prefix shape at 1/2/3 views); the fastest tiling of each shape that beats cuBLAS
#     by 3 % or more is written to tilings.json;
# (2) Pi0 1/2/3 views, two interleaved rounds of 100 calls: vision_gemm=cublas (the default), vision_gemm=triton with
#     the sweep's tilings (with_vision_tilings.py), and vision_gemm=triton as committed (VISION_GEMM_DEFAULT_TILING);
# (3) the GEMM's GPU tests and the vision tower's.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R/gemm $R/ab
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $R/machine.txt
cat $R/machine.txt
OUT=$R/gemm timeout 170 python3 benchmarks/micro_gemm_shapes.py --only v_qkv,v_o,v_fc1,v_fc2 --cublas-views 1,2,3 \
  --tilings-out $R/tilings.json > $R/gemm/gemm.log 2>&1; echo "gemm rc $?" >> $R/steps.txt
cp $R/gemm/gemm.log $OUT/gemm.log; cat $R/tilings.json
[ -s $R/tilings.json ] || echo "{}" > $R/tilings.json; echo "{}" > $R/empty.json
for r in 1 2; do for v in cublas swept committed; do
  [ $r = 2 ] && v=$(case $v in cublas) echo committed;; committed) echo cublas;; *) echo swept;; esac)
  opt=$([ $v = cublas ] && echo cublas || echo triton); table=$([ $v = swept ] && echo $R/tilings.json || echo $R/empty.json)
  timeout 75 python3 benchmarks/with_vision_tilings.py $table bench --backends triton --graphs on --iters 100 \
    --warmup 5 --device cuda --size real --models pi0 --views 1,2,3 --triton-options vision_gemm=$opt \
    --json $R/ab/bench_${v}_r$r.json > $R/ab/bench_${v}_r$r.log 2>&1; echo "ab $v r$r rc $?" >> $R/steps.txt
  grep -E "pi0 .*median" $R/ab/bench_${v}_r$r.log; done; done
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py tests/test_triton_encoder.py > $R/tests.log 2>&1
echo "tests rc $?" >> $R/steps.txt
tail -2 $R/tests.log
cd $OUT && tar czf results.tgz r && cp r/steps.txt . && cp r/tilings.json . 2>/dev/null; cat steps.txt
