#!/usr/bin/env bash
# One GPU call for the Triton backend. Each step has its own time limit so one slow step cannot eat the
# rest; everything lands in $OUT (PACK=1 packs it into $OUT/results.tgz: the device tool returns 8 files).
#   bash benchmarks/gpu_triton_check.sh                 # ~8 min: the numbers of issues 3 and 5
#       Pi0 1/2/3 views and Pi0.5 (median of ITERS=100, CUDA graphs), OpenVLA-7B (PyTorch eager, PyTorch +
#       graphs, Triton + graphs), real-size verify of Pi0 and Pi0.5, per-kernel profiles of Pi0 and OpenVLA
#   MODE=ab bash benchmarks/gpu_triton_check.sh         # A/B of the opt-in kernels (fused combine, split-K
#       skinny GEMMs, Triton patch embedding, folded norms): bench + real-size verify each, OpenVLA too
#   MODE=extra bash benchmarks/gpu_triton_check.sh      # kernel micro-benchmarks + the Triton/token-VLA tests on the GPU
#   MODE=token_ab bash benchmarks/gpu_triton_check.sh   # ~5 min: OpenVLA / RT-2 A/B (folded norms, concurrent vision
#       towers, decode GEMV modes), real-size OpenVLA verify and profile, the token-VLA kernel tests on the GPU
#   MODE=token_final bash benchmarks/gpu_triton_check.sh # ~7 min: OpenVLA eager / graphs / Triton (+ fused combine
#       A/B), RT-2 with the fused combine, Pi0 1/2/3 views, the Triton / OpenVLA / RT-2 tests on the GPU
#   MODE=pdl bash benchmarks/gpu_triton_check.sh        # ~8 min: token-VLA decode path: GPU tests, OpenVLA A/B
#       (default, QKV/RoPE as its own kernel, PDL off, cuBLAS path), RT-2 with and without the fused QKV/RoPE, verify
#   MODE=pi0_pdl bash benchmarks/gpu_triton_check.sh    # ~8 min: Pi0 expert with PDL / split-K GEMMs A/B, Triton
#       tests on the GPU, OpenVLA default vs separate QKV/RoPE (200 calls)
#   MODE=final12 bash benchmarks/gpu_triton_check.sh    # ~9 min: OpenVLA eager / graphs / Triton, Pi0 default vs
#       split-K gate/up + head with PDL (two rounds), Pi0.5, RT-2, Pi0 verify, OpenVLA profile
#   MODE=token12 bash benchmarks/gpu_triton_check.sh    # ~6 min: OpenVLA eager / graphs / Triton, RT-2, real-size
#       OpenVLA verify, the token-VLA / PDL tests on the GPU
#   MODE=head12 bash benchmarks/gpu_triton_check.sh     # ~5 min: the LM head as a decode GEMV, A/B on OpenVLA and
#       RT-2, token tests on the GPU, real-size OpenVLA verify
#   MODE=persistent13 bash benchmarks/gpu_triton_check.sh # ~7 min: the persistent expert-layer kernel: its GPU tests,
#       micro-benchmark (tilings, phases alone, vs the kernel chain), Pi0 (VIEWS, default 2) with and without it
#   MODE=persistent13_final bash benchmarks/gpu_triton_check.sh # ~9 min: its GPU tests, Pi0 1/2/3 views and Pi0.5
#       with and without it, real-size verify of Pi0 and Pi0.5 with it
#   MODE=encoder14 bash benchmarks/gpu_triton_check.sh  # ~7 min: the fused vision tower / prefix: GPU tests,
#       micro-benchmark (stages op by op vs fused, attention variants), Pi0 (VIEWS, default 2) with and without, profile
#   MODE=encoder14_final bash benchmarks/gpu_triton_check.sh # ~9 min: GPU tests, Pi0 1/2/3 views and Pi0.5 with and
#       without the fused encoder, real-size verify of Pi0 and Pi0.5, profile
#   MODE=prefetch14 bash benchmarks/gpu_triton_check.sh # ~7 min: the expert layer's L2 prefetch: GPU tests,
#       micro-benchmark of the prefetch tilings, Pi0 2 views per CORTEXFLOW_TRITON_EXPERT_PREFETCH in PREFETCHES, Pi0.5
#   MODE=actionmlp14 bash benchmarks/gpu_triton_check.sh # ~5 min: Pi0's action MLP per CORTEXFLOW_TRITON_ACTION_MLP
#       in ACTION_MLPS (default "fp32 fused"), two interleaved rounds of Pi0 1/2/3 views, verify of each
#   MODE=host15 bash benchmarks/gpu_triton_check.sh     # ~8 min: the host side of predict (images prepared in place
#       into page-locked staging) and prompt buckets: engine GPU tests, then Pi0 1/2/3 views and Pi0.5 prompt 60 of
#       the build in OLD_TGZ (a `git archive` of the cortexflow package, default old_v11.tgz) against this one with
#       --prompt-buckets auto and off, ROUNDS interleaved rounds (default 1)
# PyTorch-backend Pi0 numbers come from bench_pytorch_baseline.py; batch scaling from gpu_batch_scaling.sh.
set -u
MODE="${MODE:-final}"; ITERS="${ITERS:-100}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results/latest}"; mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
step() { local limit=$1; shift; timeout "$limit" "$@" || echo "step failed or timed out (rc $?): $*"; }
# gpu_tests NAME "-k expression" FILE...: the given test files on the GPU into gpu_tests_NAME.txt (TESTS
# overrides the expression), its last lines shown.
gpu_tests() {
  local name=$1 expression=$2; shift 2
  step 240 python3 -m pytest -q -p no:cacheprovider "$@" -k "${TESTS:-$expression}" > "$OUT/gpu_tests_$name.txt" 2>&1
  tail -3 "$OUT/gpu_tests_$name.txt"
}
# ab_grid FINAL "ENV=VALUE... tag" ...: Pi0 (VIEWS, default 2; 1,2,3 when FINAL is 1) and, when FINAL is 1,
# Pi0.5 at prompt 60, once per variant, into bench_pi0_<tag>.json / bench_pi05_<tag>.json.
ab_grid() {
  local final=$1; shift
  local views="${VIEWS:-2}"; [ "$final" = 1 ] && views=1,2,3
  local variant tag flags
  for variant in "$@"; do
    set -- $variant; tag=${!#}; flags=("${@:1:$#-1}")
    step 110 env "${flags[@]}" "${BENCH[@]}" --models pi0 --views "$views" --prompt-len 20 \
      --json "$OUT/bench_pi0_$tag.json" 2>&1 | tail -5
    [ "$final" = 1 ] && step 70 env "${flags[@]}" "${BENCH[@]}" --models pi05 --views 2 --prompt-len 60 \
      --json "$OUT/bench_pi05_$tag.json" 2>&1 | tail -3
  done
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'python', sys.version.split()[0])" | tee -a "$OUT/gpu.txt"
BENCH=(python3 -m cortexflow.cli bench --backends triton --graphs on --iters "$ITERS" --warmup 5)
VERIFY=(python3 -m cortexflow.cli verify --backend triton --size real --device cuda --dtype bfloat16)
RT2=(python3 -m cortexflow.cli bench --backends triton --graphs on --iters 30 --warmup 3 --models rt2)
TV=CORTEXFLOW_TRITON  # prefix of the Triton backend's environment settings
case "$MODE" in
final)
  step 120 "${BENCH[@]}" --models pi0 --views 1,2,3 --prompt-len 20 --json "$OUT/bench_pi0.json" 2>&1 | tail -6
  step 60 "${BENCH[@]}" --models pi05 --views 2 --prompt-len 60 --json "$OUT/bench_pi05.json" 2>&1 | tail -4
  step 150 python3 benchmarks/bench_openvla.py --iters "$ITERS" --json "$OUT/bench_openvla.json" 2>&1 | tail -6
  for model in pi0 pi05; do
    step 60 "${VERIFY[@]}" --model "$model" --json "$OUT/verify_$model.json" > "$OUT/verify_$model.txt" 2>&1
    tail -2 "$OUT/verify_$model.txt"
  done
  step 60 python3 -m cortexflow.cli profile --model pi0 --backend triton --views 2 --size real --top 30 \
    --json "$OUT/profile_pi0_triton.json" > "$OUT/profile_pi0_triton.txt" 2>&1
  step 100 python3 -m cortexflow.cli profile --model openvla --backend triton --size real --prompt-len 26 --top 30 \
    --json "$OUT/profile_openvla_triton.json" > "$OUT/profile_openvla_triton.txt" 2>&1
  ;;
ab)
  step 60 env CORTEXFLOW_TRITON_FUSED_COMBINE=1 "${BENCH[@]}" --models pi0 --views 2 --prompt-len 20 \
    --json "$OUT/bench_pi0_fused_combine.json" 2>&1 | tail -4
  step 60 env CORTEXFLOW_TRITON_FUSED_COMBINE=1 "${VERIFY[@]}" --model pi0 --json "$OUT/verify_pi0_fused_combine.json" 2>&1 | tail -2
  for variant in "CORTEXFLOW_TRITON_SKINNY_GEMM=1 skinny_gemm" \
                 "CORTEXFLOW_TRITON_SKINNY_GEMM=1 CORTEXFLOW_TRITON_FUSED_COMBINE=1 CORTEXFLOW_TRITON_PATCH_EMBED=1 all_opt_in"; do
    set -- $variant; tag=${!#}; flags=("${@:1:$#-1}")
    step 90 env "${flags[@]}" "${BENCH[@]}" --models pi0,pi05 --views 2 --prompt-len 20,60 \
      --json "$OUT/bench_$tag.json" 2>&1 | tail -6
    step 60 env "${flags[@]}" "${VERIFY[@]}" --model pi0 --json "$OUT/verify_pi0_$tag.json" 2>&1 | tail -2
  done
  step 60 env CORTEXFLOW_TRITON_FOLD_NORMS=1 "${BENCH[@]}" --models pi0 --views 2 --prompt-len 20 \
    --json "$OUT/bench_pi0_folded.json" 2>&1 | tail -4
  step 150 env CORTEXFLOW_TRITON_SKINNY_GEMM=1 python3 benchmarks/bench_openvla.py --iters "$ITERS" \
    --json "$OUT/bench_openvla_skinny_gemm.json" 2>&1 | tail -6
  ;;
extra)
  step 240 env OUT="$OUT" python3 benchmarks/micro_decoder_kernels.py > "$OUT/micro.txt" 2>&1
  step 200 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_openvla.py tests/test_rt2.py \
    > "$OUT/kernel_tests.txt" 2>&1
  tail -3 "$OUT/kernel_tests.txt"
  ;;
token_ab)
  step 300 python3 benchmarks/bench_openvla.py --triton-only --iters "$ITERS" --json "$OUT/bench_openvla_ab.json" \
    --triton-env "v6_path=${TV}_FOLD_TOKEN_NORMS=0,${TV}_CONCURRENT=0" \
    --triton-env "fold_only=${TV}_CONCURRENT=0" \
    --triton-env "concurrent_only=${TV}_FOLD_TOKEN_NORMS=0" \
    --triton-env "gemv_out=${TV}_DECODE_GEMV=out" 2>&1 | tail -8
  step 90 "${RT2[@]}" --json "$OUT/bench_rt2.json" 2>&1 | tail -3
  step 90 env "${TV}_FOLD_TOKEN_NORMS=0" "${RT2[@]}" --json "$OUT/bench_rt2_no_fold.json" 2>&1 | tail -3
  step 120 "${VERIFY[@]}" --model openvla --json "$OUT/verify_openvla.json" > "$OUT/verify_openvla.txt" 2>&1
  tail -4 "$OUT/verify_openvla.txt"
  step 100 python3 -m cortexflow.cli profile --model openvla --backend triton --size real --prompt-len 26 --top 30 \
    --json "$OUT/profile_openvla_triton.json" > "$OUT/profile_openvla_triton.txt" 2>&1
  step 200 python3 -m pytest -q -p no:cacheprovider tests/test_decode_gemv.py tests/test_triton_kernels.py \
    tests/test_token_tools.py -k "decode_gemv or fold or rstd or verify_triton or bad_decode" \
    > "$OUT/gpu_tests_token.txt" 2>&1
  tail -3 "$OUT/gpu_tests_token.txt"
  ;;
token_final)
  step 300 python3 benchmarks/bench_openvla.py --iters "$ITERS" --json "$OUT/bench_openvla.json" \
    --triton-env "fused_combine=${TV}_FUSED_COMBINE=1" \
    --triton-env "fused_combine_gemv_out=${TV}_FUSED_COMBINE=1,${TV}_DECODE_GEMV=out" 2>&1 | tail -7
  step 90 env "${TV}_FUSED_COMBINE=1" "${RT2[@]}" --json "$OUT/bench_rt2_fused_combine.json" 2>&1 | tail -2
  step 120 "${BENCH[@]}" --models pi0 --views 1,2,3 --prompt-len 20 --json "$OUT/bench_pi0.json" 2>&1 | tail -6
  step 240 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_openvla.py tests/test_rt2.py \
    > "$OUT/gpu_tests.txt" 2>&1
  tail -3 "$OUT/gpu_tests.txt"
  ;;
pdl)
  step 240 python3 -m pytest -q -p no:cacheprovider tests/test_pdl.py tests/test_decode_gemv.py tests/test_token_tools.py \
    -k "pdl or decode_gemv or decode_qkv_rope or verify_triton" > "$OUT/gpu_tests_pdl.txt" 2>&1
  tail -3 "$OUT/gpu_tests_pdl.txt"
  step 300 python3 benchmarks/bench_openvla.py --triton-only --iters "$ITERS" --json "$OUT/bench_openvla_pdl.json" \
    --triton-env "separate_qkv_rope=${TV}_DECODE_QKV_ROPE=0" --triton-env "no_pdl=${TV}_PDL=0" \
    --triton-env "cublas_no_pdl=${TV}_DECODE_GEMV=0,${TV}_PDL=0" 2>&1 | tail -8
  step 90 "${RT2[@]}" --json "$OUT/bench_rt2.json" 2>&1 | tail -2
  step 90 env "${TV}_DECODE_QKV_ROPE=0" "${RT2[@]}" --json "$OUT/bench_rt2_separate_qkv_rope.json" 2>&1 | tail -2
  step 120 "${VERIFY[@]}" --model openvla --json "$OUT/verify_openvla.json" > "$OUT/verify_openvla.txt" 2>&1
  tail -4 "$OUT/verify_openvla.txt"
  ;;
pi0_pdl)
  step 240 python3 -m pytest -q -p no:cacheprovider tests/test_pdl.py tests/test_skinny_gemm.py tests/test_decode_gemv.py \
    tests/test_triton_kernels.py > "$OUT/gpu_tests_pi0_pdl.txt" 2>&1
  tail -3 "$OUT/gpu_tests_pi0_pdl.txt"
  for variant in "${TV}_PDL=1 default" "${TV}_PDL=0 no_pdl" "${TV}_SKINNY_GEMM=1 skinny" \
                 "${TV}_SKINNY_GEMM=1 ${TV}_PDL=0 skinny_no_pdl" "${TV}_SKINNY_GEMM=mlp_head mlp_head"; do
    set -- $variant; tag=${!#}; flags=("${@:1:$#-1}")
    step 90 env "${flags[@]}" "${BENCH[@]}" --models pi0 --views 2 --prompt-len 20 \
      --json "$OUT/bench_pi0_$tag.json" 2>&1 | tail -1
  done
  step 60 env "${TV}_SKINNY_GEMM=1" "${VERIFY[@]}" --model pi0 --json "$OUT/verify_pi0_skinny.json" 2>&1 | tail -1
  step 300 python3 benchmarks/bench_openvla.py --triton-only --iters 200 --json "$OUT/bench_openvla.json" \
    --triton-env "separate_qkv_rope=${TV}_DECODE_QKV_ROPE=0" 2>&1 | tail -4
  ;;
final12)
  step 200 python3 benchmarks/bench_openvla.py --iters "$ITERS" --json "$OUT/bench_openvla.json" 2>&1 | tail -5
  for round in 1 2; do
    for variant in "${TV}_SKINNY_GEMM=0 default" "${TV}_SKINNY_GEMM=mlp_head mlp_head"; do
      set -- $variant; tag=${!#}; flags=("${@:1:$#-1}")
      views=2; [ "$round" = 1 ] && views=1,2,3
      step 90 env "${flags[@]}" "${BENCH[@]}" --models pi0 --views "$views" --prompt-len 20 \
        --json "$OUT/bench_pi0_${tag}_r$round.json" 2>&1 | tail -1
      [ "$round" = 1 ] && step 60 env "${flags[@]}" "${BENCH[@]}" --models pi05 --views 2 --prompt-len 60 \
        --json "$OUT/bench_pi05_${tag}.json" 2>&1 | tail -1
    done
  done
  step 60 "${RT2[@]}" --json "$OUT/bench_rt2.json" 2>&1 | tail -1
  step 60 env "${TV}_SKINNY_GEMM=mlp_head" "${VERIFY[@]}" --model pi0 --json "$OUT/verify_pi0_mlp_head.json" 2>&1 | tail -1
  step 90 python3 -m cortexflow.cli profile --model openvla --backend triton --size real --prompt-len 26 --top 30 \
    --json "$OUT/profile_openvla_triton.json" > "$OUT/profile_openvla_triton.txt" 2>&1
  ;;
token12)
  step 200 python3 benchmarks/bench_openvla.py --iters "$ITERS" --json "$OUT/bench_openvla.json" 2>&1 | tail -5
  step 60 "${RT2[@]}" --json "$OUT/bench_rt2.json" 2>&1 | tail -1
  step 120 "${VERIFY[@]}" --model openvla --json "$OUT/verify_openvla.json" > "$OUT/verify_openvla.txt" 2>&1
  tail -2 "$OUT/verify_openvla.txt"
  step 240 python3 -m pytest -q -p no:cacheprovider tests/test_pdl.py tests/test_decode_gemv.py tests/test_token_tools.py \
    tests/test_rt2.py -k "pdl or decode or verify_triton or rt2" > "$OUT/gpu_tests_token.txt" 2>&1
  tail -2 "$OUT/gpu_tests_token.txt"
  ;;
head12)
  step 240 python3 -m pytest -q -p no:cacheprovider tests/test_pdl.py tests/test_decode_gemv.py tests/test_token_tools.py \
    -k "pdl or decode or greedy or verify_triton or bad_decode" > "$OUT/gpu_tests_head.txt" 2>&1
  tail -2 "$OUT/gpu_tests_head.txt"
  step 240 python3 benchmarks/bench_openvla.py --triton-only --iters "$ITERS" --json "$OUT/bench_openvla_head.json" \
    --triton-env "head_on_cublas=${TV}_DECODE_HEAD=0" 2>&1 | tail -3
  step 60 "${RT2[@]}" --json "$OUT/bench_rt2.json" 2>&1 | tail -1
  step 60 env "${TV}_DECODE_HEAD=0" "${RT2[@]}" --json "$OUT/bench_rt2_head_on_cublas.json" 2>&1 | tail -1
  step 120 "${VERIFY[@]}" --model openvla --json "$OUT/verify_openvla.json" > "$OUT/verify_openvla.txt" 2>&1
  tail -2 "$OUT/verify_openvla.txt"
  ;;
persistent13|persistent13_final)
  # The persistent expert layer: its GPU tests, then Pi0 (and for _final Pi0.5) with and without it.
  gpu_tests persistent "expert or end_to_end" tests/test_expert_layer.py tests/test_triton_kernels.py
  final=0; [ "$MODE" = persistent13_final ] && final=1
  [ "$final" = 0 ] && step 240 env OUT="$OUT" python3 benchmarks/micro_expert_layer.py 2>&1 | tail -22
  ab_grid "$final" "${TV}_PERSISTENT_EXPERT=0 default" "${TV}_PERSISTENT_EXPERT=1 persistent"
  if [ "$final" = 1 ]; then
    for model in pi0 pi05; do
      step 60 env "${TV}_PERSISTENT_EXPERT=1" "${VERIFY[@]}" --model $model \
        --json "$OUT/verify_${model}_persistent.json" 2>&1 | tail -4
    done
  fi
  ;;
encoder14|encoder14_final)
  # The fused vision tower and prefix: their GPU tests, then Pi0 (and for _final Pi0.5) with and without them.
  gpu_tests encoder "encoder or layer_norm or end_to_end" tests/test_triton_encoder.py tests/test_triton_kernels.py
  final=0; [ "$MODE" = encoder14_final ] && final=1
  [ "$final" = 0 ] && step 240 env OUT="$OUT" python3 benchmarks/micro_encoder.py 2>&1 | tail -24
  ab_grid "$final" "${TV}_FUSED_ENCODER=0 op_by_op" "${TV}_FUSED_ENCODER=1 fused"
  if [ "$final" = 1 ]; then
    for model in pi0 pi05; do
      step 60 "${VERIFY[@]}" --model $model --json "$OUT/verify_$model.json" 2>&1 | tail -4
    done
    step 60 env "${TV}_FUSED_ENCODER=0" "${VERIFY[@]}" --model pi0 --json "$OUT/verify_pi0_op_by_op.json" 2>&1 | tail -1
  fi
  step 60 python3 -m cortexflow.cli profile --model pi0 --backend triton --views 2 --size real --top 40 \
    --json "$OUT/profile_pi0_triton.json" > "$OUT/profile_pi0_triton.txt" 2>&1
  tail -30 "$OUT/profile_pi0_triton.txt"
  ;;
prefetch14)
  # The persistent expert layer's L2 prefetch: GPU tests (bit-identical results), the micro-benchmark's prefetch
  # tilings, Pi0 2 views at each CORTEXFLOW_TRITON_EXPERT_PREFETCH value in PREFETCHES, Pi0.5 at 0 and the last.
  gpu_tests prefetch "expert or encoder or layer_norm or end_to_end" tests/test_expert_layer.py \
    tests/test_triton_encoder.py tests/test_triton_kernels.py
  step 200 env OUT="$OUT" python3 benchmarks/micro_expert_layer.py --only prefetch --no-phases 2>&1 | tail -10
  for pf in ${PREFETCHES:-0 1 2 5 6}; do
    step 60 env "${TV}_EXPERT_PREFETCH=$pf" "${BENCH[@]}" --models pi0 --views 2 --prompt-len 20 \
      --json "$OUT/bench_pi0_prefetch$pf.json" 2>&1 | tail -3 | head -1
  done
  for pf in 0 ${pf:-0}; do
    step 60 env "${TV}_EXPERT_PREFETCH=$pf" "${BENCH[@]}" --models pi05 --views 2 --prompt-len 60 \
      --json "$OUT/bench_pi05_prefetch$pf.json" 2>&1 | tail -3 | head -1
  done
  ;;
actionmlp14)
  # Pi0's action MLP per CORTEXFLOW_TRITON_ACTION_MLP value in ACTION_MLPS (run 7: fp32 and bf16, then named
  # CORTEXFLOW_TRITON_LOW_PRECISION_ACTION_MLP=0/1): its GPU tests, two interleaved rounds of Pi0 1/2/3 views,
  # verify of each.
  gpu_tests action_mlp "action_mlp or end_to_end" tests/test_action_mlp.py tests/test_triton_kernels.py
  for round in 1 2; do
    for mlp in ${ACTION_MLPS:-fp32 fused}; do
      step 100 env "${TV}_ACTION_MLP=$mlp" "${BENCH[@]}" --models pi0 --views 1,2,3 --prompt-len 20 \
        --json "$OUT/bench_pi0_action_mlp_${mlp}_r$round.json" 2>&1 | tail -5 | head -3
    done
  done
  for mlp in ${ACTION_MLPS:-fp32 fused}; do
    step 60 env "${TV}_ACTION_MLP=$mlp" "${VERIFY[@]}" --model pi0 --json "$OUT/verify_pi0_action_mlp_$mlp.json" 2>&1 | tail -1
  done
  ;;
host15)
  gpu_tests engine "engine or buckets or staging or end_to_end or device or gpu" tests/test_engine_io.py \
    tests/test_processing.py tests/test_triton_kernels.py
  old="${OLD_TGZ:-old_v11.tgz}"; mkdir -p /tmp/old_build && tar xzf "$old" -C /tmp/old_build
  for round in $(seq 1 "${ROUNDS:-1}"); do
    # from inside the old tree: `python -m` puts the working directory first on sys.path
    (cd /tmp/old_build && step 110 env PYTHONPATH=/tmp/old_build "${BENCH[@]}" --models pi0 --views 1,2,3 \
      --prompt-len 20 --json "$OUT/bench_pi0_old_r$round.json" 2>&1 | tail -5 | head -3)
    step 110 "${BENCH[@]}" --models pi0 --views 1,2,3 --prompt-len 20 --json "$OUT/bench_pi0_new_r$round.json" 2>&1 \
      | tail -5 | head -3
    (cd /tmp/old_build && step 70 env PYTHONPATH=/tmp/old_build "${BENCH[@]}" --models pi05 --views 2 --prompt-len 60 \
      --json "$OUT/bench_pi05_old_r$round.json" 2>&1 | tail -3 | head -1)
    for buckets in auto off; do
      step 70 "${BENCH[@]}" --models pi05 --views 2 --prompt-len 60 --prompt-buckets $buckets \
        --json "$OUT/bench_pi05_new_${buckets}_r$round.json" 2>&1 | tail -3 | head -1
    done
    if [ -n "${IMAGES_AB:-}" ]; then  # images prepared on the host (the default before) against the GPU
      step 110 "${BENCH[@]}" --models pi0 --views 1,2,3 --prompt-len 20 --image-preprocessing host \
        --json "$OUT/bench_pi0_new_host_images_r$round.json" 2>&1 | tail -5 | head -3
    fi
  done
  if [ -n "${VERIFY_TOO:-}" ]; then
    for model in pi0 pi05; do
      step 60 "${VERIFY[@]}" --model $model --json "$OUT/verify_$model.json" 2>&1 | tail -1
    done
  fi
  python3 - "$OUT" <<'PY'
import glob, json, os, sys
print("check: the old build reports", {json.load(open(p))["runs"][0]["prefix_tokens"] for p in glob.glob(sys.argv[1] + "/bench_pi05_old*.json")}, "prefix tokens (712 = no buckets)")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "bench_*.json"))):
    for run in json.load(open(path))["runs"]:
        print(f"{os.path.basename(path):34s} {run['model']:5s} views={run['views']} median {run['median_ms']:7.2f} ms "
              f"preprocess {run.get('preprocess_median_ms', float('nan')):5.2f} ms prefix {run['prefix_tokens']}")
PY
  ;;
*) echo "unknown MODE=$MODE (final, ab, extra, token_ab, token_final, pdl, pi0_pdl, final12, token12, head12, persistent13, persistent13_final, encoder14, encoder14_final, prefetch14, actionmlp14, host15)"
   exit 2 ;;
esac
if [ "${PACK:-0}" = 1 ]; then
  tar czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/results.tgz"
fi
