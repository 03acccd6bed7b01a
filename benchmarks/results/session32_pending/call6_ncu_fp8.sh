# Pending device call, written in session 32 (~4 min on an H100): Nsight Compute of one middle layer of the persistent
# expert layer with bf16 weights and with E4M3 weights at the backend's FP8 tiling (micro_expert_layer.py --ncu
# [--fp8]), each split into phases by benchmarks/ncu_phase_stalls.py: where the FP8 layer's extra ~5 us go.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $R/machine.txt
python3 -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $R/machine.txt
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU" >> $R/steps.txt
for w in bf16 fp8; do
  flag=""; [ $w = fp8 ] && flag="--fp8"
  timeout 150 $NCU --clock-control none --profile-from-start off -k regex:expert_layer --launch-skip 1 --launch-count 1 \
    --set full --import-source no -o $R/expert_$w python3 benchmarks/micro_expert_layer.py --ncu $flag > $R/ncu_$w.log 2>&1
  echo "ncu $w rc $?" >> $R/steps.txt
  $NCU -i $R/expert_$w.ncu-rep --page details > $R/ncu_details_$w.txt 2>&1
  $NCU -i $R/expert_$w.ncu-rep --page source --csv --print-source sass > $R/ncu_sass_$w.csv 2>&1
  python3 benchmarks/ncu_phase_stalls.py $R/ncu_sass_$w.csv --out $R/phases_$w.json > $R/phases_$w.txt 2>&1
  echo "phases $w rc $?" >> $R/steps.txt
done
cd $OUT && tar czf results.tgz r && cp r/steps.txt r/phases_bf16.txt r/phases_fp8.txt r/ncu_details_fp8.txt . ; cat steps.txt phases_*.txt
