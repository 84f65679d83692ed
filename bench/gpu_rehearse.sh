#!/usr/bin/env bash
# Rehearse the GPU check here, on CPU: bench/gpu_check.sh exactly as the GPU machine runs it, in a fresh virtual
# environment that holds only what that machine's image holds of the project's needs (torch, torchvision, the
# machine's transformers release, peft, accelerate, numpy, pillow, pyyaml, ...; no DeepSpeed, bitsandbytes or PyAV;
# the project not installed), plus the bundle of .gpu-bundle/ (its transformers, peft and hub wheels are
# py3-none-any and tokenizers/safetensors abi3, so the CPython 3.12 wheels install on this 3.11 too). Tiny model,
# small steps; then checks what landed in $OUT. Exit 0 when everything but the GPU is proven.
#
#   bash bench/gpu_rehearse.sh            (make gpu-rehearse; the environment is kept in .gpu-rehearse/ for next time)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${REHEARSE_PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.gpu-rehearse/venv
# The device image's packages (its torch is 2.11 with CUDA 13; the nearest this machine has on disk is 2.14.1).
IMAGE_PACKAGES="torch==2.14.1 torchvision==0.29.1 transformers==5.17.0 peft accelerate safetensors tokenizers numpy pillow pyyaml"
STAMP="$VENV/.installed"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$IMAGE_PACKAGES" ]; then
    rm -rf "$VENV"
    echo "gpu-rehearse: creating $VENV with: $IMAGE_PACKAGES (a few minutes the first time)"
    "$PYTHON" -m venv "$VENV"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $IMAGE_PACKAGES
    echo "$IMAGE_PACKAGES" > "$STAMP"
fi
for absent in deepspeed bitsandbytes av actionft; do
    if "$VENV/bin/python" -c "import $absent" 2>/dev/null; then
        echo "gpu-rehearse: $absent is importable in $VENV; the device image has no $absent" >&2; exit 1
    fi
done

"$VENV/bin/python" bench/gpu_bundle.py --size-only
# a bundle wheel built for CPython 3.12 only (pydantic-core): the same release for this Python, into the venv
"$VENV/bin/python" - <<'EOF'
import subprocess, sys
from pathlib import Path
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
supported = set(sys_tags())
need = [f"{name}=={version}" for name, version, _, tags in
        (parse_wheel_filename(w.name) for w in sorted(Path(".gpu-bundle").glob("*.whl"))) if not tags & supported]
if need:
    print(f"gpu-rehearse: for this Python, the same releases as the bundle's cp312-only wheels: {' '.join(need)}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *need],
                   check=True)
EOF
OUT=${OUT:-$(mktemp -d)}
echo "gpu-rehearse: running bench/gpu_check.sh in tiny mode, OUT=$OUT"
rc=0
# one thread per process: the rehearsal proves the path, not the speed, and on a small shared CPU more threads per
# process only contend with each other
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OUT="$OUT" PYTHON="$VENV/bin/python" GPU_CHECK_MODE=tiny \
    GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-2400} \
    GPU_CHECK_ARGS="--steps 1 --warmup 1 --max-soft-tokens 70 --pool 8 --min-variant-s 10" \
    bash bench/gpu_check.sh || rc=$?
echo "gpu-rehearse: gpu_check.sh exited $rc"
"$VENV/bin/python" bench/gpu_records.py check "$OUT" --bundle .gpu-bundle
