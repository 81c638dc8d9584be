#!/usr/bin/env bash
# The main job on the bundled default (models/digits32_*.pt), from a fresh clone:
#   1. set up .venv if needed;
#   2. sample the same seeds seven ways under `mpiexec -n 2` with the real sampling script and
#      the digits preset: no guidance, SAG, PAG, SEG, classifier guidance (CG), SAG + CG, PAG + CG;
#   3. evaluate all of them against the digits data set in one evaluator run, with the noisy
#      classifier at t=0 as feature network (FID / precision / recall in that space, and the
#      accuracy of the generated labels; NOT comparable to Inception FID);
#   4. draw pictures of what SAG, PAG and SEG do (runs/default/pictures/).
# Environment: OUT (default runs/default), NUM_SAMPLES (default 48 per run), NPROC (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
OUT=${OUT:-runs/default}
export NPROC=${NPROC:-2} MPIEXEC=${MPIEXEC:-$PWD/.venv/bin/mpiexec}
# One thread per MPI rank while sampling and drawing; the evaluation (one process) uses all cores.
RANK_THREADS=${OMP_NUM_THREADS:-1}
NUM_SAMPLES=${NUM_SAMPLES:-48}
source configs/digits.sh  # MODEL_FLAGS SAG_FLAGS PAG_FLAGS SEG_FLAGS CLASSIFIER_FLAGS SAMPLE_FLAGS MODEL_PATH
mkdir -p "$OUT"

runs=(none sag pag seg cg sag_cg pag_cg)
declare -A guidance=([none]=sag [sag]=sag [pag]=pag [seg]=seg [cg]=sag [sag_cg]=sag [pag_cg]=pag)
declare -A extra=(
  [none]="--guide_scale 1.0 --classifier_guidance False"
  [sag]="--classifier_guidance False"
  [pag]="--classifier_guidance False"
  [seg]="--classifier_guidance False"
  [cg]="--guide_scale 1.0 --classifier_guidance True"
  [sag_cg]="--classifier_guidance True"
  [pag_cg]="--classifier_guidance True"
)
samples=()
for run in "${runs[@]}"; do
  echo "=== sampling: $run (mpiexec -n $NPROC)"
  # shellcheck disable=SC2086
  # --fast_attention True: SDPA attention and the fast PAG / SEG ops (same numbers to ~1e-6).
  GUIDANCE=${guidance[$run]} OMP_NUM_THREADS=$RANK_THREADS bash configs/digits.sh --num_samples "$NUM_SAMPLES" \
      --seed 0 --save_grid 64 --progress False --fast_attention True --output_dir "$OUT/$run" ${extra[$run]}
  samples+=("$(ls "$OUT/$run"/samples_*.npz)")
done

echo "=== evaluating (classifier features; not comparable to Inception FID)"
# The classifier's architecture flags (not --classifier_scale) for the feature network.
eval_flags=$(echo "$CLASSIFIER_FLAGS" | sed -E 's/--classifier_scale [^ ]+//')
# shellcheck disable=SC2086
"$PY" evaluations/evaluator.py datasets/digits32.npz "${samples[@]}" --features classifier \
    $eval_flags $(echo "$MODEL_FLAGS" | grep -oE -- '--(image_size|num_classes) [^ ]+' | tr '\n' ' ') \
    --batch_size 100 --no_progress --report "$OUT/report.json" > "$OUT/evaluation.txt"
cat "$OUT/evaluation.txt"

echo "=== pictures"
# The rows are shared out among the ranks (one thread each: a lone process with two threads
# slows down badly as soon as anything else runs on the machine). PAG rows without the original's
# unused random draws: every row then gets the same DDPM noise (with them the draws shift the
# noise stream and a PAG row shows other digits).
# shellcheck disable=SC2086
OMP_NUM_THREADS=$RANK_THREADS "$MPIEXEC" -n "$NPROC" "$PY" scripts/visualize_sag.py $SAG_FLAGS $MODEL_FLAGS $CLASSIFIER_FLAGS --model_path "$MODEL_PATH" \
    $SAMPLE_FLAGS --fast_attention True --num_images 6 --seed 1 --out_dir "$OUT/pictures" \
    --compare_flags "$PAG_FLAGS --pag_reproduce_rng False" --compare_flags "$SEG_FLAGS"
echo "done: samples in $OUT/{$(IFS=,; echo "${runs[*]}")}, evaluation in $OUT/evaluation.txt, pictures in $OUT/pictures"
