#!/usr/bin/env bash
# The GPU work of issues #4 and #5, for a lent GPU machine (torch, transformers, pytest; no Ray,
# DeepSpeed, pydantic, boto3 or mistral-common). One part per call, each well inside 10 minutes:
#
#   make gpu-bundle        # here: copies the embedded tokenizer's model into .gpu/ (git-ignored)
#   device run:  bash benchmarks/gpu_session.sh tests     carry: [".gpu"]
#                bash benchmarks/gpu_session.sh train     (MFU of a 0.85B Mistral in bf16, target ≥ 45%; compiled norms/MLPs)
#                bash benchmarks/gpu_session.sh train-layers  (the same with whole decoder layers compiled)
#                bash benchmarks/gpu_session.sh upload    (step time during a checkpoint upload, ≤ 1.1×)
#                bash benchmarks/gpu_session.sh serve     (engine batching vs sequential at 0.85B)
#   make gpu-serve-bundle  # here: Ray Serve, pydantic, FastAPI, openai… for Python 3.12: .gpu/serve-site-py3.12.tar.xz
#                bash benchmarks/gpu_session.sh endpoint  (the OpenAI endpoint under load vs sequential, 0.85B on one GPU;
#                                                          ~2.5 min with the defaults, see endpoint_run)
#                bash benchmarks/gpu_session.sh all       (every part in turn: only with 10 minutes to spare)
#
# Knobs (environment): BATCH_MAX_LEN (train, 16384), TRAIN_ARGS (more benchmarks.train_throughput options, e.g. --attention per-row), UPLOAD_BLOCKS (upload, 3), SERVE_REPEATS (serve, 3),
# SERVE_ARGS (more benchmarks.serve_load options, e.g. --sdpa-backends torch for torch's own attention kernels),
# ENDPOINT_CONCURRENCY (endpoint, 1,16,64), ENDPOINT_REPEATS (endpoint, 1), ENDPOINT_MODES (endpoint, stream; stream,whole
# adds the non-streamed runs), ENDPOINT_BASELINE_REQUESTS (endpoint, 4 per sequential run), ENDPOINT_ARGS (more
# benchmarks.serve_load options for the endpoint part).
# Each part prints the GPU first and writes its log to $OUT/<part>.log (the device tool brings
# $OUT back) or to ./gpu-logs/ elsewhere. tests/benchmarks/test_gpu_box.py runs the same scripts on
# the CPU without those packages, so a missing import shows up in CI, not on the lent machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[[ -f .gpu/tokenizer.model.v1 && -z "${RAYCHAT_TOKENIZER_MODEL:-}" ]] && export RAYCHAT_TOKENIZER_MODEL="$PWD/.gpu/tokenizer.model.v1"
read -ra PY <<< "${PYTHON:-python3}"  # e.g. PYTHON="python3 -S"
DEVICE=${DEVICE:-cuda} MODEL=${MODEL:-1b}  # DEVICE=cpu MODEL=tiny: a dry run of this script on a CPU

part() {
    local name=$1 start=$SECONDS; shift
    echo "==> $name: $*"
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
      "${PY[@]}" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
      "$@"; } 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "==> $name: exit $rc after $((SECONDS - start)) s"
    return "$rc"
}

SERVE_SITE=
serve_site() {  # Ray Serve & co. from make gpu-serve-bundle (built for this Python), unpacked once per bundle
    local ver bundle sum site=/tmp/raychat-site
    ver=$("${PY[@]}" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || return 1
    bundle=.gpu/serve-site-py$ver.tar.xz
    [[ -f $bundle ]] || return 0
    sum=$(cksum < "$bundle")  # a rebuilt bundle replaces what an earlier call on this machine unpacked
    if [[ $(cat "$site/.done" 2>/dev/null) != "$sum" ]]; then
        echo "==> unpacking $bundle into $site"
        rm -rf "$site" && mkdir -p "$site" && "${PY[@]}" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='tar')" \
            "$bundle" "$site" && echo "$sum" > "$site/.done" || return 1
    fi
    # Right after the repository, ahead of the machine's site-packages (and any PYTHONPATH it had):
    # where the bundle and the machine both have a package (grpcio: 1.85 here, 1.84 there), the
    # bundle's must be imported, since its other packages were built against it.
    export PYTHONPATH="$PWD:$site${PYTHONPATH#"$PWD"}" SERVE_SITE=$site
}

# The endpoint part, with the defaults: one repeat of streamed requests at concurrency 1, 16 and
# 64, each Serve run between sequential runs of 4 requests (raychat's engine and transformers'
# generate, before and after). Expected on an H200 (estimated from the engine's figures there —
# ~0.6 s per 64-token request sequentially, ~3,000 tok/s batched — not yet timed end to end):
# ~1 min to write and load the 0.85B checkpoint and start Ray Serve, ~0.5 min for the in-process
# batch ceilings, ~1 min for the Serve runs and their baselines: ~2.5 min, well inside 5. Each
# ENDPOINT_REPEATS adds ~1.5 min; ENDPOINT_MODES=stream,whole ~1 min more per repeat. The old
# defaults (2 repeats, both modes: 12 Serve runs) ran past 400 s.
endpoint_run() {
    if [[ -n $SERVE_SITE ]]; then  # the bundle's own packages first on sys.path, the machine's new enough
        "${PY[@]}" -m benchmarks.gpu_serve_bundle --check "$SERVE_SITE" || echo "==> bundle check failed (above); going on"
    fi
    local cmd=("${PY[@]}" -m benchmarks.serve_load --model "$MODEL" --arms combined
        --num-gpus "$([[ $DEVICE == cuda ]] && echo 1 || echo 0)" --concurrency "${ENDPOINT_CONCURRENCY:-1,16,64}"
        --modes "${ENDPOINT_MODES:-stream}" --repeats "${ENDPOINT_REPEATS:-1}"
        --baseline-requests "${ENDPOINT_BASELINE_REQUESTS:-4}" ${ENDPOINT_ARGS:-})
    echo "${cmd[*]}"
    "${cmd[@]}"
}

gpu_test_files() { grep -rlE 'pytest\.mark\.gpu' tests --include='test_*.py' | sort; }

train_part() {  # name, compile scope
    part "$1" "${PY[@]}" -m benchmarks.train_throughput --synthetic --device "$DEVICE" --model "$MODEL" --no-baseline \
        --repeats 3 --max-steps 10 --batch-max-len "${BATCH_MAX_LEN:-16384}" --compile "$2" ${TRAIN_ARGS:-}
}

run_part() {
    case $1 in
        tests) part tests "${PY[@]}" -m pytest -q -p no:cacheprovider -m gpu -rs $(gpu_test_files) ;;
        train) train_part train norms-mlps ;;
        train-layers) train_part train-layers layers ;;
        upload) part upload "${PY[@]}" -m benchmarks.checkpoint_upload --device "$DEVICE" --model "$MODEL" --dest /tmp/raychat-sink --blocks "${UPLOAD_BLOCKS:-3}" ;;
        serve) part serve "${PY[@]}" -m benchmarks.serve_load --engine-only --device "$DEVICE" --model "$MODEL" --concurrency 1,4,16,64 --repeats "${SERVE_REPEATS:-3}" ${SERVE_ARGS:-} ;;
        endpoint) serve_site && part endpoint endpoint_run ;;
        *) echo "usage: $0 tests|train|train-layers|upload|serve|endpoint|all" >&2; return 2 ;;
    esac
}

if [[ ${1:-} == all ]]; then
    rc=0
    for p in tests train train-layers upload serve; do run_part "$p" || rc=1; done
    exit "$rc"
fi
run_part "${1:-}"
