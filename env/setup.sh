#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at .venv and install
# slurmtune into it with every dependency pinned.
#
#   bash env/setup.sh            # idempotent; ~2 min on a fresh machine, ~1 s after
#
# torch is installed on its own, first, as torch==2.13.0: on the clusters'
# login nodes and on our CI machines that resolves to a prebuilt wheel, while
# any looser request (from transformers, peft, ...) would download a CUDA
# build of several GB. Everything else comes from env/requirements.txt.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SLURMTUNE_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.slurmtune-installed"

# Reinstall only when the pins changed since the last successful install.
want="$(cat "$root/env/requirements.txt" "$root/setup.cfg" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup: creating $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# This machine's pip configuration names local mirrors that may be absent; pip says so
# once per package. Keep real warnings, drop that noise.
quiet() { "$@" 2> >(grep -v "^WARNING: Location '" >&2); }

echo "setup: installing torch==2.13.0 (CPU build) first"
quiet "${pip[@]}" install -q torch==2.13.0
echo "setup: installing pinned dependencies (env/requirements.txt)"
quiet "${pip[@]}" install -q -r "$root/env/requirements.txt"
echo "setup: installing slurmtune (editable)"
quiet "${pip[@]}" install -q --no-deps --no-build-isolation -e "$root"
"${pip[@]}" check
echo "$want" > "$stamp"
echo "setup: ready: $venv"
