#!/usr/bin/env bash
# Create the project's virtualenv and install the project into it (editable, with test extras).
# Usage: scripts/bootstrap.sh PYTHON VENV_DIR [EXTRAS]   (EXTRAS: default "test"; `make bench`: "test,bench")
#        scripts/bootstrap.sh --which-python   prints the interpreter `make` uses when PYTHON is not
#        given: python3 if it is a supported version, else the first supported of python3.13,
#        python3.12, python3.11 on PATH (else python3, which the check below then refuses).
# Supported: Python 3.11, 3.12 and 3.13 (pyproject.toml's requires-python; README "Python versions").
set -euo pipefail
supported="3.11 3.12 3.13"

# X.Y.Z of an interpreter, or nothing when it does not run (missing, or a pyenv shim of a version
# that is not selected).
version_of() {
  "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || true
}
is_supported() {  # $1: X.Y.Z
  [ -n "$1" ] && case " $supported " in *" ${1%.*} "*) true ;; *) false ;; esac
}
refuse() {  # $1: interpreter, $2: its version (may be empty), $3: what to do
  local found="not a working Python"
  [ -z "$2" ] || found="Python $2"
  echo "bootstrap: $1 is $found; dicom_assets needs Python 3.11, 3.12 or 3.13. $3" >&2
  exit 1
}

if [ "${1:-}" = --which-python ]; then
  for candidate in python3 python3.13 python3.12 python3.11; do
    path=$(command -v "$candidate") || continue
    if is_supported "$(version_of "$path")"; then echo "$path"; exit 0; fi
  done
  echo python3
  exit 0
fi

python=${1:-python3}
venv=${2:-.venv}
extras=${3:-test}
pick="Pick one: make PYTHON=/path/to/python3.12 install (or scripts/bootstrap.sh /path/to/python3.12 $venv)"

if [ -e "$venv/bin/python" ]; then
  # An existing virtualenv is kept (`make install` stays idempotent), whatever PYTHON says.
  have=$(version_of "$venv/bin/python")
  is_supported "$have" || refuse "$venv/bin/python" "$have" "Delete $venv (make clean), then: make PYTHON=/path/to/python3.12 install"
  want=$(version_of "$python")
  if [ "${want%.*}" != "${have%.*}" ]; then
    echo "bootstrap: keeping $venv (Python $have), not $python${want:+ (Python $want)}; to rebuild it: make clean install PYTHON=$python" >&2
  fi
else
  want=$(version_of "$python")
  is_supported "$want" || refuse "$python" "$want" "$pick"
  if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "python${want%.*}-venv"
    else
      echo "bootstrap: Python's venv module is missing: sudo apt-get install python${want%.*}-venv" >&2
      exit 1
    fi
  fi
  echo "bootstrap: creating $venv with $python (Python $want)"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[$extras]"

# `dagster asset materialize --select inventory` (without -m) needs the module name; Dagster's
# CLI reads every option from DAGSTER_CLI_<COMMAND>_<OPTION>, so the virtualenv provides it.
line='export DAGSTER_CLI_ASSET_MATERIALIZE_MODULE_NAME=dicom_assets'
grep -qxF "$line" "$venv/bin/activate" || printf '\n# dicom_assets: lets `dagster asset materialize --select X` find the code location\n%s\n' "$line" >> "$venv/bin/activate"
echo "bootstrap: installed into $venv"
