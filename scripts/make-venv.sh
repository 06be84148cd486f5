#!/usr/bin/env bash
# Make .venv from requirements.lock, then install this checkout into it (editable).
#
# Installing the lock takes minutes; the result depends on nothing but the lock. So it is built
# once per lock (by its hash) under the cache folder, and each checkout's .venv is a copy of it
# made of hard links (seconds, no extra disk), with the scripts' interpreter lines pointing at the
# copy; only the project itself is installed into the copy. A fresh clone on a machine that built
# this lock before is ready in seconds; a new lock, or a new machine, builds it as before.
# FLYWHEEL_VENV_CACHE=none builds .venv in place, with no cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

install_lock() {  # $1: the venv to install the lock into
  "$1/bin/python" -m pip install --quiet --upgrade "pip>=24"
  # CPU build of PyTorch first: any other order lets pip pull a multi-GB CUDA build.
  "$1/bin/python" -m pip install --quiet torch==2.13.0
  # The lock pins every package: no resolver run. (Not --no-compile: where PYTHONDONTWRITEBYTECODE
  # is set, nothing would ever be compiled and every process would compile MLflow again.)
  "$1/bin/python" -m pip install --quiet --no-deps -r requirements.lock
}

store=${FLYWHEEL_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flywheel/venvs}
rm -rf "$VENV"
if [ "$store" = none ]; then
  "$PYTHON" -m venv "$VENV"
  install_lock "$VENV"
else
  cached="$store/$("$PYTHON" -c 'import sys; print("py%d.%d" % sys.version_info[:2])')-$(sha256sum requirements.lock | cut -c1-16)"
  if [ ! -f "$cached/.complete" ]; then
    rm -rf "$cached"
    mkdir -p "$store"
    "$PYTHON" -m venv "$cached"
    install_lock "$cached"
    touch "$cached/.complete"
  fi
  cp -al "$cached" "$VENV" 2>/dev/null || { rm -rf "$VENV"; cp -a "$cached" "$VENV"; }  # another disk
  rm -f "$VENV/.complete"
  here="$(pwd)/$VENV"
  # Interpreter lines and activate scripts name the venv's path: point them at the copy (sed -i
  # writes new files, so the cached venv's own files stay as they are).
  for f in "$VENV"/bin/*; do
    if [ -f "$f" ] && [ ! -L "$f" ] && grep -Iq "$cached" "$f"; then
      sed -i "s|$cached|$here|g" "$f"
    fi
  done
  # pyvenv.cfg and anything else that names the cached path, as new files too
  sed -i "s|$cached|$here|g" "$VENV/pyvenv.cfg"
fi
"$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
touch "$VENV/.installed"
