#!/usr/bin/env bash
# Refresh the lock files: `bash constraints/refresh.sh`, then run `bash .ci/run` and commit both files.
# Run it after changing a dependency in pyproject.toml (tests/test_lock.py fails until you do) or to take
# newer releases on purpose. It installs each environment from pyproject.toml's ranges into a fresh virtual
# environment, as a user without the lock would, checks that it imports, and writes what pip chose.
# About 5 minutes with a warm pip cache; the IPEX environment downloads ~3.5 GB of torch 2.8 CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

# The torch release each environment is locked to: pyproject.toml's `torch>=2.8` would take the newest
# (a CUDA build), and IPEX 2.8 runs only on torch 2.8.
TORCH_MAIN=2.13.0
TORCH_IPEX=2.8.0
# Every extra but ipex lives in the main environment; the IPEX environment holds all of them.
EXTRAS_MAIN=dev,postgres,onnxruntime,openvino
EXTRAS_IPEX=dev,postgres,onnxruntime,openvino,ipex

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# lock NAME TORCH EXTRAS IMPORTS: resolve one environment and write its pins to $work/NAME.txt.
lock() {
    local name=$1 torch=$2 extras=$3 imports=$4 venv="$work/$1"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "torch==$torch"
    "$venv/bin/pip" install --quiet -e ".[$extras]"
    "$venv/bin/python" -c "import $imports"  # a lock that cannot import is no lock
    {
        echo "# Lock for the $name environment: \`pip install -c constraints/$name.txt -e \".[...]\"\`."
        echo "# Written by constraints/refresh.sh from pyproject.toml (torch==$torch, extras $extras) on"
        echo "# $(date -u +%F), $("$venv/bin/python" -c 'import platform; print("Python", platform.python_version(), platform.system(), platform.machine())'). Do not edit by hand."
        # --all keeps setuptools (torch needs it at run time); pip itself stays out. Local version labels
        # (torch's `+cpu` from a local wheel) are dropped: the index has no such name, and `torch==2.13.0`
        # still matches a local `2.13.0+cpu` wheel where one is offered.
        "$venv/bin/pip" freeze --all --exclude-editable | grep -v '^pip==' | sed -E 's/\+[A-Za-z0-9.]+$//' |
            LC_ALL=C sort -f
    } >"$work/$name.txt"
    echo "constraints/$name.txt: $(grep -vc '^#' "$work/$name.txt") pins"
}

lock main "$TORCH_MAIN" "$EXTRAS_MAIN" "fastcpu.trial, fastcpu_runtime, onnxruntime, openvino, nncf, psycopg"
lock ipex "$TORCH_IPEX" "$EXTRAS_IPEX" "intel_extension_for_pytorch, fastcpu.trial, fastcpu_runtime"
# Both resolved and imported: only now replace the committed files.
cp "$work/main.txt" "$work/ipex.txt" constraints/
