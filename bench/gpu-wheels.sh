#!/usr/bin/env bash
# Fill .whl-1/ and .whl-2/ with the wheels bench/gpu.sh needs on a GPU node that has torch,
# peft and accelerate but nothing else of ours (this project's device machine: Python 3.12,
# no network). Run it here, where pip can download:
#
#   bash bench/gpu-wheels.sh
#
# The set (about 68 MB, bitsandbytes alone 43 MB) is more than one device call may carry
# (64 MiB), so it is split in two: carry .whl-1 in a first call that only installs
# (`bash bench/gpu.sh --install-only`), then .whl-2 in the next call, within the machine's warm
# time, which installs the rest into the same folder and runs the bench. Versions are this
# project's pins (env/requirements.txt, env/requirements-gpu.txt).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pin() { grep -ihE "^$1==" "$root/env/requirements.txt" "$root/env/requirements-gpu.txt" | head -1; }
platforms=(--platform manylinux2014_x86_64 --platform any)
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
download() {  # download DIR PACKAGE...
    local dir=$1; shift
    mkdir -p "$dir"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$dir" "$@"
}
first=(bitsandbytes)
second=(transformers trl datasets huggingface_hub dill multiprocess jsonlines jsonschema
        jsonschema-specifications referencing rpds-py hjson pydantic pydantic_core typing-inspection
        annotated-types httpx2 httpcore2 liger-kernel)
download "$root/.whl-1" $(for p in "${first[@]}"; do pin "$p"; done)
download "$root/.whl-2" $(for p in "${second[@]}"; do pin "$p"; done)
# DeepSpeed publishes no wheel; building one is pure Python and needs no torch.
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$root/.whl-2" "$(pin deepspeed)"
for dir in .whl-1 .whl-2; do
    echo "$dir: $(ls "$root/$dir"/*.whl | wc -l) wheels, $(du -cb "$root/$dir"/*.whl | tail -1 | cut -f1) bytes"
done
