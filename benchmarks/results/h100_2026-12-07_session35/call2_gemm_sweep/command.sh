# Device call 2 of session 35 (warm, 60 s; the rest of the budget after call 1): session 34's SigLIP GEMM sweep at
# 2 views alone (micro_gemm_shapes.py as of commit a2b75aa; cuBLAS times of every Pi0 vision / prefix shape at 2 views).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/machine.txt
OUT=$OUT timeout 200 python3 benchmarks/micro_gemm_shapes.py --only v_qkv,v_o,v_fc1,v_fc2 --cublas-views 2 \
  --tilings-out $OUT/tilings.json > $OUT/gemm.log 2>&1; echo "rc $?" >> $OUT/machine.txt; tail -40 $OUT/gemm.log
