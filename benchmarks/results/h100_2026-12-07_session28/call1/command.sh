# Device call of session 28 (written in session 27, extended in 28; new build = the commit adding this file; the device copy's git HEAD is stale).
# Two A/Bs of one build (euler: interleaved in two rounds; the embedding's placement: one round, in round 1), Pi0 and Pi0.5 at 2 views, prompt 20, 30 calls each:
#  "old" = --token-embedding device (the text embedding table on the GPU, as before this session),
#  "new" = the defaults (token_embedding auto = host on a GPU; expert_launch layer),
#  "opt" = the defaults with expert_launch=euler (session 26: a whole Euler step in one launch, never timed),
#  "optg" = opt with vision_gelu=epilogue (session 28: SigLIP's GELU in cuBLASLt's fc1 epilogue, 27 kernels fewer).
# Predictions: new vs old: peak GPU memory of the calls -0.98 GiB (257152 x 2048 bf16 rows), time within the
# spread (128 KiB more in the input copy, the lookup's kernels gone); both builds leave out the last prefix layer's
# unread o / MLP weights (-0.195 GiB), so Pi0 2 views ~6.01 GiB old, ~5.03 new (session 19: 6.21);
# opt vs new: -0.2 to -0.4 ms (-1.5 to -2.5 %); optg vs opt: -0.05 to -0.15 ms (27 GELU kernels of ~3.5 us + gaps).
# Steps pack OUT/call.tgz, most needed first: (1) verify Pi0 with euler at real size; (2) the benches; (3) the GPU
# tests of the Euler step and of the host embedding.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s28call; rm -rf $R; mkdir -p $R/ab
pack() { echo "$1 rc $2 $(date +%T)" >> $R/steps.txt; tar czf $OUT/call.tgz -C $R . ; cp $R/steps.txt $OUT/; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > $R/machine.txt
timeout 90 python3 -m cortexflow.cli verify --model pi0 --backend triton --size real --device cuda \
  --triton-options expert_launch=euler,vision_gelu=epilogue --json $R/ab/verify_pi0_euler_gelu.json > $R/verify_pi0.log 2>&1
pack verify $?
bench() {  # bench BUILD ROUND OPTIONS EMBEDDING
  timeout 100 python3 -m cortexflow.cli bench --backends triton --graphs on --iters 30 --warmup 5 --device cuda \
    --size real --models pi0,pi05 --views 2 --prompt-len 20 --triton-options "$3" --token-embedding $4 \
    --json $R/ab/bench_pi0family_$1_r$2.json > $R/bench_$1_r$2.log 2>&1
  pack bench_$1_r$2 $?
}
bench new 1 expert_launch=layer auto; bench opt 1 expert_launch=euler auto
bench optg 1 expert_launch=euler,vision_gelu=epilogue auto; bench old 1 expert_launch=layer device
bench optg 2 expert_launch=euler,vision_gelu=epilogue auto; bench opt 2 expert_launch=euler auto
bench new 2 expert_launch=layer auto
python3 benchmarks/ab_summary.py $R/ab $R/ab > $R/summary.txt 2>&1
python3 - $R/ab >> $R/summary.txt 2>&1 <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("bench_*.json")):
    for row in json.loads(path.read_text())["runs"]:
        print(path.stem, row["model"], "median", row["median_ms"], "peak_gpu_gib", row.get("peak_gpu_gib"),
              "load_peak_gpu_gib", row.get("load_peak_gpu_gib"), "preprocess_ms", row.get("preprocess_ms"))
PY
pack summary $?
cp $R/summary.txt $OUT/
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_expert_step.py tests/test_engine_io.py \
  tests/test_triton_encoder.py -k "euler or token_embedding or graphs_of_several or gelu" > $R/tests.log 2>&1
pack tests $?
cp $R/summary.txt $OUT/
timeout 90 python3 -m cortexflow.cli profile --model pi0 --backend triton --views 2 --size real --device cuda \
  --triton-options expert_launch=euler,vision_gelu=epilogue --json $R/profile_pi0_euler_gelu.json > $R/profile.log 2>&1
pack profile $?
