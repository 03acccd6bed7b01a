# Device call A of session 33 (~9 min on an H100):
# 1. micro_expert_layer.py --fp8 --step: the FP8 default (f16 operands, bits, weights first) against the same with
#    joined tiles (ExpertTiling.fp8_joined_tiles) and the bf16 kernel (session 32's call5_joined.sh, item 1).
# 2. Nsight Compute of one launch of the step kernel (18 layers; micro_expert_layer.py --ncu --step), bf16 and E4M3
#    weights, with --cache-control none (the instruction cache carries over from layer to layer, as in the
#    backend's graph), its stall reasons over the whole kernel (ncu_phase_stalls.py --whole): is instruction
#    fetch ("no_instruction", a top stall of session 20's one-layer profile, taken with the caches flushed) a
#    cost of the production kernel, whose sm_90 code is 8,584 SASS instructions (137 KB)?
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R/micro
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > $R/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $R/machine.txt
OUT=$R/micro timeout 130 python3 benchmarks/micro_expert_layer.py --fp8 --step --no-phases --only "weights first" \
  > $R/micro/micro.log 2>&1; echo "micro rc $?" >> $R/steps.txt
grep -E "^(persistent|step kernel|kernel chain)" $R/micro/micro.log | head -20
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU" >> $R/steps.txt
for w in bf16 fp8; do
  flag=""; [ $w = fp8 ] && flag="--fp8"
  timeout 170 $NCU --cache-control none --clock-control none --profile-from-start off -k regex:expert_step \
    --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SourceCounters --section LaunchStats \
    --section Occupancy --section SchedulerStats --import-source no -o $R/step_$w \
    python3 benchmarks/micro_expert_layer.py --ncu --step $flag > $R/ncu_$w.log 2>&1
  echo "ncu $w rc $?" >> $R/steps.txt
  $NCU -i $R/step_$w.ncu-rep --page details > $R/ncu_details_$w.txt 2>&1
  $NCU -i $R/step_$w.ncu-rep --page source --csv --print-source sass > $R/ncu_sass_$w.csv 2>&1
  python3 benchmarks/ncu_phase_stalls.py $R/ncu_sass_$w.csv --whole --out $R/stalls_$w.json > $R/stalls_$w.txt 2>&1
  echo "stalls $w rc $?" >> $R/steps.txt
done
cd $OUT && tar czf results.tgz r && cp r/steps.txt r/stalls_bf16.txt r/stalls_fp8.txt r/micro/micro_expert_layer.json . 2>/dev/null
cat r/steps.txt r/stalls_*.txt
grep -E "Duration|Issue Slots Busy|No Eligible|Stall No Instruction|Warp Cycles Per Issued" r/ncu_details_*.txt | head -30
