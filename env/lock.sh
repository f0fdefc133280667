#!/usr/bin/env bash
# Re-resolve env/requirements.txt from env/requirements.in in a scratch venv.
# Run this when you change a top-level dependency, then commit both files.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/pip" install -q torch==2.13.0
"$scratch/venv/bin/pip" install -q -r "$root/env/requirements.in"
{
    echo "# Full pinned environment of slurmtune (Python 3.11, CPU), resolved from env/requirements.in."
    echo "# torch is NOT listed: env/setup.sh installs torch==2.13.0 first (the CPU build), so that"
    echo "# nothing below can pull in a multi-GB CUDA build. Regenerate with env/lock.sh."
    "$scratch/venv/bin/pip" freeze | grep -v -e '^torch==' -e '^-e '
} > "$root/env/requirements.txt"
echo "wrote env/requirements.txt"
