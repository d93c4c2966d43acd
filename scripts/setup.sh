#!/usr/bin/env bash
# Create .venv (Python 3.12) in the repo root and install prolong-nemo with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  for cand in python3.12 "$(command -v pyenv >/dev/null 2>&1 && echo "$(pyenv root)/versions/3.12"*/bin/python3)" \
              /root/.pyenv/versions/3.12*/bin/python3 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  PY=$(find_python312) || { echo "error: Python 3.12 not found (PATH, pyenv, /usr/bin)" >&2; exit 1; }
  echo "creating .venv with $PY"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-cpu.txt -e '.[test]'

# Packages the tests read but that must NOT be importable from the venv itself (each beside it,
# --no-deps, in its own folder; tests put it on sys.path or use it in a subprocess):
# - megatron-bridge: the real glue code it calls into; it imports TE, which a CPU cannot load.
# - nemo-run: its normal install pulls ray and downgrades httpx/anyio/urllib3.
# - transformers 5: what NGC containers ship; proves our modules import beside it.
extra() { local dir=.venv/extras/$1; shift; [ -d "$dir" ] || .venv/bin/python -m pip install -q --no-deps --target "$dir" "$@"; }
extra bridge megatron-bridge==0.6.2
extra bridge05 megatron-bridge==0.5.0
extra nemo-run -r recipes/requirements-launch.txt
extra transformers5 transformers==5.12.1 huggingface-hub==1.5.0 typer click shellingham annotated-doc
# - what Megatron-Bridge's pretrain() loop imports beyond megatron-core (tests/bridge_runtime.py
#   runs that loop on CPU); pinned to versions that import beside transformers 5 / numpy < 2.2.
extra bridge-runtime datasets==4.4.1 pyarrow==26.0.1 pandas==3.1.1 dill==0.4.0 multiprocess==0.70.18 \
  einops==0.8.2 nvidia-modelopt==0.47.0 pulp==4.2.0 orloge==1.0.0 cpsat_logutils==1.0.0 scipy==1.18.1 \
  tensorboard==2.21.0 absl-py==2.5.1
# - megatron-core 0.17 / 0.18: what NGC NeMo 26.04 / 26.06 ship; the core tests run again on each.
extra mcore017 megatron-core==0.17.1
extra mcore018 megatron-core==0.18.2
echo "prolong-nemo installed in .venv"
