#!/usr/bin/env bash
# The GPU checks of issue #6 as one prepared run that fits a short device lease.
#
#   bash scripts/gpu_check.sh            # on a CUDA machine, from the repository root
#
#   bash scripts/gpu_check.sh overlap cg128  # only these stages (a second call on a warm machine)
#
# Stages, most important first; each runs only if the time left (BUDGET_S, default 540 s from
# the start) covers its expected length, and is cut off at its own limit (see run_stage):
#   b256      benchmark, 256 layout, batch 16: orig-style fp16 vs fast path (compiled): the
#             speed-up target (falls back to an uncompiled fast path if compiling fails)
#   agree     every GPU path against exact fp32 on the bundled model, step by step, --check
#             (the GPU test of tests/test_fast_path_agreement.py, with its table kept)
#   overlap   the classifier gradient on a side CUDA stream gives the same samples (GPU tests)
#   exact256  benchmark, 256 layout, batch 16, exact fp32
#   pag256    benchmark, 256 layout, batch 5 (the published PAG runs) and 16, PAG and SEG:
#             orig-style fp16 vs fast path, and whether one pass of 2B beats two passes of B
#   cg128     benchmark, 128 layout, batch 16, SAG + classifier guidance (overlap gain)
#   agree256  agreement figures on the 256 layout (random weights)
#   graphs256 benchmark, 256 layout, batch 16, fast path with CUDA graphs
#   b64       benchmark, 256 and 128 layouts, batch 64, orig-style fp16 and fast path
#   exact128  benchmark, 128 layout, batch 16 and 64, exact fp32
# A 15-minute lease fits about the first four in one call; the summary names what was skipped,
# to be run in a second call while the machine is warm (torch.compile's cache is kept there).
# Every benchmark appends its table to a copy of docs/benchmarks.md; the copy, the log and a
# summary land in OUT (default runs/gpu_check), written as the stages go, so a run that is
# killed still returns what it measured. Copy OUT/benchmarks.md over docs/benchmarks.md, then
# fill the "Results on GPU" table from it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
BUDGET_S=${BUDGET_S:-540}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.txt
DOC=$OUT/benchmarks.md
cp docs/benchmarks.md "$DOC"
: >"$LOG"
: >"$SUMMARY"
T0=$SECONDS

say() { echo "$*" | tee -a "$SUMMARY" "$LOG"; }

# stage NAME EXPECTED_S LIMIT_S COMMAND...: run if EXPECTED_S still fits, cut off at LIMIT_S
# (or at the end of the budget). Returns the command's status (125 when skipped).
stage() {
    local name=$1 expected=$2 limit=$3
    shift 3
    local left=$((BUDGET_S - (SECONDS - T0)))
    if ((left < expected)); then
        say "SKIPPED $name (needs ~${expected}s, ${left}s left)"
        return 125
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s): $*" >>"$LOG"
    local start=$SECONDS status
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    say "$( ((status == 0)) && echo PASSED || echo "FAILED (status $status)") $name in $((SECONDS - start))s"
    return "$status"
}

BENCH=("$PYTHON" scripts/benchmark_sampling.py --out "$DOC" --guidances sag)  # pag256: PAG / SEG
# MODEL_FLAGS and SAG_FLAGS of the bundled default (configs/digits.sh)
DIGITS_FLAGS=$(source configs/digits.sh && echo "$MODEL_FLAGS $SAG_FLAGS")

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.is_available())'
} 2>&1 | tee -a "$SUMMARY" "$LOG"
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
    { say "no CUDA GPU visible: nothing to check"; exit 1; }

run_stage() {
    case $1 in
    b256)  # the speed-up target; an uncompiled fast path if compiling fails
        stage "b256: benchmark 256 b16, orig-style fp16 and fast (compiled)" 90 300 \
            "${BENCH[@]}" --layouts 256 --batch_sizes 16 --paths fp16,fast && return 0
        local first=$?
        stage "b256: benchmark 256 b16, orig-style fp16 and fast (uncompiled)" 40 120 \
            "${BENCH[@]}" --layouts 256 --batch_sizes 16 --paths fp16,fast --compile False
        (($? == 125)) && return $first ;;
    agree)  # = test_gpu_paths_within_tolerance_on_the_bundled_model, with the table kept
        stage "agree: every GPU path vs exact fp32 on the bundled model (--check)" 90 300 \
            "$PYTHON" scripts/compare_fast_path.py $DIGITS_FLAGS --model_path models/digits32_diffusion.pt \
            --batch_size 16 --device cuda --check True --out "$DOC" ;;
    overlap)
        stage "overlap: classifier gradient on a side stream, same samples (GPU tests)" 30 120 \
            "$PYTHON" -m pytest -q -p no:cacheprovider -k "overlap and cuda" tests/test_fast_path_agreement.py ;;
    exact256)
        stage "exact256: benchmark 256 b16, exact fp32" 80 150 \
            "${BENCH[@]}" --layouts 256 --batch_sizes 16 --paths exact ;;
    pag256)
        stage "pag256: benchmark 256 b5 and b16, PAG and SEG, orig-style fp16 and fast" 100 240 \
            "${BENCH[@]}" --layouts 256 --batch_sizes 5,16 --paths fp16,fast --guidances pag,seg ;;
    cg128)
        stage "cg128: benchmark 128 b16, SAG + classifier guidance (overlap gain)" 90 200 \
            "${BENCH[@]}" --layouts 128 --batch_sizes 16 --paths fp16,fast --classifier_guidance True ;;
    agree256)
        stage "agree256: agreement figures, 256 layout, random weights" 40 90 \
            "$PYTHON" scripts/compare_fast_path.py --image_size 256 --num_channels 256 --num_res_blocks 2 \
            --attention_resolutions 32,16,8 --num_head_channels 64 --resblock_updown True \
            --use_scale_shift_norm True --learn_sigma True --sel_attn_depth 2 --blur_sigma 9 \
            --model_path random --batch_size 4 --timestep_respacing ddim10 \
            --paths orig_fp16,fp16,bf16,bf16+tf32+nhwc --out "$DOC" ;;
    graphs256)
        stage "graphs256: benchmark 256 b16, fast path with CUDA graphs" 60 180 \
            "${BENCH[@]}" --layouts 256 --batch_sizes 16 --paths fast --cuda_graphs True ;;
    b64)
        stage "b64: benchmark 256 and 128 b64, orig-style fp16 and fast" 120 240 \
            "${BENCH[@]}" --layouts 256,128 --batch_sizes 64 --paths fp16,fast ;;
    exact128)
        stage "exact128: benchmark 128 b16 and b64, exact fp32" 90 200 \
            "${BENCH[@]}" --layouts 128 --batch_sizes 16,64 --paths exact ;;
    *)
        say "unknown stage $1 (stages: ${ALL_STAGES[*]})"
        return 2 ;;
    esac
}

ALL_STAGES=(b256 agree overlap exact256 pag256 cg128 agree256 graphs256 b64 exact128)
failed=0
for name in "${@:-${ALL_STAGES[@]}}"; do
    run_stage "$name"
    status=$?
    ((status != 0 && status != 125)) && failed=1
done
say "total $((SECONDS - T0))s of a ${BUDGET_S}s budget; tables appended to $DOC"
exit $failed
