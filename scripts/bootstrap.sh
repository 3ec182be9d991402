#!/usr/bin/env bash
# Create the project's virtualenv and install the project into it (editable, with test extras).
# Usage: scripts/bootstrap.sh PYTHON VENV_DIR [EXTRAS]   (EXTRAS: default "test"; `make bench`: "test,bench")
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}
extras=${3:-test}

if ! "$python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  echo "bootstrap: $python is not Python 3.11 (found: $("$python" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
  else
    echo "bootstrap: Python's venv module is missing: sudo apt-get install python3-venv" >&2
    exit 1
  fi
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[$extras]"

# `dagster asset materialize --select inventory` (without -m) needs the module name; Dagster's
# CLI reads every option from DAGSTER_CLI_<COMMAND>_<OPTION>, so the virtualenv provides it.
line='export DAGSTER_CLI_ASSET_MATERIALIZE_MODULE_NAME=dicom_assets'
grep -qxF "$line" "$venv/bin/activate" || printf '\n# dicom_assets: lets `dagster asset materialize --select X` find the code location\n%s\n' "$line" >> "$venv/bin/activate"
echo "bootstrap: installed into $venv"
