export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $R/machine.txt
python3 -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $R/machine.txt
timeout 170 python3 benchmarks/bench_fp8_decode.py --sweep fp8 --shapes gate_up,down --skip prefill --out $R/gemv.json > $R/gemv.log 2>&1; echo "gemv rc $?" >> $R/steps.txt
OUT=$R timeout 90 python3 benchmarks/micro_expert_layer.py --quick > $R/micro.log 2>&1; echo "micro rc $?" >> $R/steps.txt
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU" >> $R/steps.txt
timeout 200 $NCU --clock-control none --profile-from-start off -k regex:expert_layer --launch-skip 1 --launch-count 1 --set full --import-source no -o $R/expert python3 benchmarks/micro_expert_layer.py --ncu > $R/ncu.log 2>&1; echo "ncu rc $?" >> $R/steps.txt
$NCU -i $R/expert.ncu-rep --page details > $R/ncu_details.txt 2>&1
$NCU -i $R/expert.ncu-rep --page source --csv --print-source sass > $R/ncu_sass.csv 2>&1; echo "sass rc $?" >> $R/steps.txt
$NCU -i $R/expert.ncu-rep --page raw --csv > $R/ncu_raw.csv 2>&1
cd $OUT && tar czf results.tgz r && cp r/steps.txt r/gemv.log r/micro.log r/ncu_details.txt . ; ls -la $OUT
