# Shared by the presets in this folder (sourced, not run).
#
# A preset sets MODEL_FLAGS, SAG_FLAGS, SAMPLE_FLAGS, MODEL_PATH and, for classifier_sample.py,
# CLASSIFIER_FLAGS, then calls `run_preset SCRIPT "$@"`.  When the preset itself is sourced
# (`source configs/x.sh`) only the variables are exported; when it is run
# (`bash configs/x.sh [extra flags]`) it prints and runs
#
#   [mpiexec -n $NPROC] python scripts/SCRIPT $SAG_FLAGS $MODEL_FLAGS $CLASSIFIER_FLAGS \
#       --model_path $MODEL_PATH $SAMPLE_FLAGS [extra flags]
#
# (the published order).  Extra flags come last, so they override the preset (argparse keeps the
# last value).  Environment: NPROC (default 1: no mpiexec), MPIEXEC (default mpiexec), PYTHON
# (default: the repository's .venv python if present, else python).

run_preset() {
    local script=$1
    shift
    export MODEL_FLAGS SAG_FLAGS SAMPLE_FLAGS CLASSIFIER_FLAGS MODEL_PATH
    # Sourced preset (BASH_SOURCE[1] is the preset file, $0 is not): export only.
    if [[ "${BASH_SOURCE[1]}" != "$0" ]]; then
        return 0
    fi
    local root python
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    python=${PYTHON:-}
    if [[ -z $python ]]; then
        if [[ -x $root/.venv/bin/python ]]; then python=$root/.venv/bin/python; else python=python; fi
    fi
    local -a cmd=()
    if [[ ${NPROC:-1} -gt 1 ]]; then
        cmd=("${MPIEXEC:-mpiexec}" -n "$NPROC")
    fi
    # shellcheck disable=SC2206  # the flag strings are meant to be word-split
    cmd+=("$python" "$root/scripts/$script" $SAG_FLAGS $MODEL_FLAGS ${CLASSIFIER_FLAGS:-}
          --model_path "$MODEL_PATH" $SAMPLE_FLAGS "$@")
    echo "+ ${cmd[*]}" >&2
    "${cmd[@]}"
}
