#!/usr/bin/env bash
# Verify and measure the GPU paths of slurmtune's train job in one go (bench/bench_gpu.py):
#
#   bash bench/gpu.sh [--out FILE] [bench_gpu.py options]   # on a GPU node: under 8 minutes
#   bash bench/gpu.sh --cpu-smoke                           # anywhere: the same script, tiny, on CPU
#   bash bench/gpu.sh --install-only                        # install carried wheels, run nothing
#
# Python: .venv/bin/python when this checkout has one (env/setup.sh), else python3 (a GPU node's
# own torch); then the packages it lacks travel as wheels in .whl/, .whl-1/ or .whl-2/ (nothing
# can be fetched on such a node; bench/gpu-wheels.sh downloads them), installed into
# $SLURMTUNE_GPU_SITE (default /tmp/slurmtune-gpu-site, kept, so a second call adds to what a
# first installed), and slurmtune itself is used from this checkout without installing it.
# The table goes to --out (default bench/gpu-results.txt; $OUT/gpu-results.txt when OUT is set).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=python3
wheels=()
site=${SLURMTUNE_GPU_SITE:-/tmp/slurmtune-gpu-site}
mkdir -p "$site"
shopt -s nullglob
if [ -x "$root/.venv/bin/python" ]; then
    python="$root/.venv/bin/python"  # complete: carried wheels are for a node without it
else
    wheels=("$root"/.whl/*.whl "$root"/.whl-1/*.whl "$root"/.whl-2/*.whl)
fi
if ((${#wheels[@]})); then
    echo "gpu.sh: installing ${#wheels[@]} carried wheel(s) into $site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${wheels[@]}"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$python" -c "import slurmtune" 2> /dev/null; then
    ln -sfn "$root/lib" "$site/slurmtune"  # the package's source, as setup.cfg maps it
fi
args=()
for arg in "$@"; do
    [ "$arg" = --install-only ] && { echo "gpu.sh: installed; nothing run"; exit 0; }
    args+=("$arg")
done
[[ " ${args[*]:-} " == *" --out "* ]] || args+=(--out "${OUT:+$OUT/gpu-results.txt}")
[ "${args[-1]}" != "" ] || args[-1]="$root/bench/gpu-results.txt"
exec "$python" "$root/bench/bench_gpu.py" "${args[@]}"
