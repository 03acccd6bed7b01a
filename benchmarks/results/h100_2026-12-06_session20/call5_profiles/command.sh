# device call of session 20 (H100 80GB HBM3): torch-profiler breakdowns of the final build (no CUDA graph)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/machine.txt
timeout 120 python3 -m cortexflow.cli profile --model pi0 --backend triton --views 2 --size real --top 30 --json $OUT/profile_pi0.json > $OUT/profile_pi0.txt 2>&1; echo "pi0 rc $?" >> $OUT/steps.txt
timeout 150 python3 -m cortexflow.cli profile --model openvla --backend triton --size real --precision fp8 --top 30 --json $OUT/profile_openvla_fp8.json > $OUT/profile_openvla_fp8.txt 2>&1; echo "openvla rc $?" >> $OUT/steps.txt
