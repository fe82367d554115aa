#!/usr/bin/env bash
# This project's pure-Python pins as wheels, for a GPU host that has torch but no package index (a lent machine, a
# cluster's compute node). The host's own torch, tokenizers, safetensors, huggingface_hub and accelerate are used.
#
#   bash benchmarks/offline_wheels.sh download          # where pip reaches an index: the wheels into .whl/ (15 MB)
#   bash benchmarks/offline_wheels.sh run COMMAND ...   # on the host: .whl/ installed into /tmp/site, then COMMAND
#
# e.g. `bash benchmarks/offline_wheels.sh run python3 -m benchmarks.gpu_table --output-dir runs/gpu-table`
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${OFFLINE_WHEELS:-.whl}
SITE=${OFFLINE_SITE:-/tmp/site}

case "${1:-}" in
download)
    # the versions requirements.txt pins (one home for them), and a regex recent enough for transformers' import check
    mapfile -t pins < <(grep -E '^(transformers|fschat|peft|gguf)==' requirements.txt)
    # the host's Python: 3.12 on x86-64 Linux by default
    python3 -m pip download --no-deps --only-binary=:all: --python-version "${OFFLINE_PYTHON:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" "${pins[@]}" 'regex>=2025.10.22'
    ls -l "$WHEELS"
    ;;
run)
    shift
    [ $# -gt 0 ] || { echo "error: run needs a command, e.g. run python3 -m benchmarks.gpu_table" >&2; exit 2; }
    compgen -G "$WHEELS/*.whl" >/dev/null || { echo "error: no wheels in $WHEELS: run download first" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    if ! command -v python >/dev/null; then  # train.sh calls `python`; some hosts have python3 alone
        mkdir -p "$SITE/bin" && ln -sf "$(command -v python3)" "$SITE/bin/python" && export PATH="$SITE/bin:$PATH"
    fi
    python3 -c 'import torch, transformers, peft, fastchat; print("torch", torch.__version__, "transformers",
transformers.__version__, "peft", peft.__version__, "fschat", fastchat.__version__, "cuda", torch.cuda.is_available())'
    exec "$@"
    ;;
*)
    echo "usage: bash benchmarks/offline_wheels.sh download | run COMMAND ..." >&2
    exit 2
    ;;
esac
