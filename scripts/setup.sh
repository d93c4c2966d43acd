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
echo "prolong-nemo installed in .venv"
