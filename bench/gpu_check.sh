#!/usr/bin/env bash
# The GPU benchmark in one command, on a bare, offline GPU machine that received this working tree and .gpu-bundle/
# (made here by `make gpu-bundle`). Installs the bundle into a temporary site folder (the project itself is not
# installed: PYTHONPATH=lib), runs the E4B variants of bench/bench_train.py that fit in the time budget (the first
# candidate of reference, fastest, lowmem and qlora first, each in its own process with a timeout), and writes
# into $OUT:
#
#   gpu_check.json    one record per configuration (written after every variant, so a stopped run keeps what it
#                     measured): samples/s, peak memory, MFU, loss, device, torch/CUDA and package versions, the SDPA
#                     kernel that ran on the head-dim-512 full-attention layers, the optimizer and ZeRO stage used
#   gpu_check.md      the markdown table, under the machine's description
#   environment.json  Python, device, CUDA, package versions and where they were imported from, the bundle manifest
#   gpu_check.log     everything printed
#
# Settings (environment variables): OUT (default outputs/gpu_check), GPU_CHECK_BUDGET_S (seconds for all variants,
# default 420), GPU_CHECK_MODE (e4b; tiny for the CPU rehearsal), GPU_CHECK_ARGS (more bench_train.py options),
# GPU_BUNDLE (default .gpu-bundle), PYTHON (default: the first python3/python on PATH that imports torch).
# Exit status: 0 when at least one variant was measured and none failed; 1 otherwise (the files are written anyway).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
MODE=${GPU_CHECK_MODE:-e4b}
BUNDLE=${GPU_BUNDLE:-.gpu-bundle}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
started=$(date +%s)

main() {

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in python3 python /opt/torch/.venv/bin/python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
            PY=$(command -v "$candidate"); break
        fi
    done
fi
if [ -z "$PY" ]; then echo "gpu_check: no Python with torch found; set PYTHON=/path/to/python"; return 1; fi
echo "gpu_check: $(date -u +%FT%TZ), $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])')), mode $MODE, budget ${BUDGET} s"

# 1. the bundle, into a temporary site folder that goes first on the path (the machine's own packages stay untouched)
SITE="$TMP/site"
mkdir -p "$SITE"
shopt -s nullglob
all_wheels=("$BUNDLE"/*.whl)
# only the wheels this Python takes (all of them on the GPU machine's 3.12; the CPU rehearsal's 3.11 has the
# cp312-only ones installed at the same version beforehand)
mapfile -t wheels < <("$PY" - "${all_wheels[@]}" <<'EOF'
import sys
try:
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename
except ImportError:
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import parse_wheel_filename
supported = set(sys_tags())
for wheel in sys.argv[1:]:
    if parse_wheel_filename(wheel.rsplit("/", 1)[-1])[3] & supported:
        print(wheel)
    else:
        print(f"gpu_check: {wheel} is not for this Python; the installed release serves", file=sys.stderr)
EOF
)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_check: no wheels in $BUNDLE/ (make gpu-bundle, then carry it): using the machine's own packages"
elif ! "$PY" -m pip install --quiet --no-deps --no-index --no-compile --disable-pip-version-check \
        --target "$SITE" "${wheels[@]}"; then
    # no pip on the machine: a wheel is a zip of the installed files
    echo "gpu_check: pip failed; unpacking the wheels into $SITE instead"
    "$PY" - "$SITE" "${wheels[@]}" <<'EOF' || return 1
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
EOF
fi
echo "gpu_check: installed ${#wheels[@]} wheel(s) from $BUNDLE/ in $(( $(date +%s) - started )) s"
export PYTHONPATH="$SITE:$PWD/lib${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# actionft first: importing it silences known harmless library messages (bitsandbytes speaks as peft imports it)
smoke="import actionft, transformers, peft, accelerate; from transformers import Gemma4ForConditionalGeneration, Trainer"
if ! "$PY" -c "$smoke"; then
    # the bundled hub may need what the machine lacks: let the machine's own hub serve, and say so
    echo "gpu_check: the bundle does not import as installed; retrying with the machine's own huggingface_hub"
    rm -rf "$SITE"/huggingface_hub "$SITE"/huggingface_hub-*.dist-info
    "$PY" -c "$smoke" || { echo "gpu_check: transformers/peft/accelerate do not import; see above"; return 1; }
fi

# 2. what is on this machine, before anything can fail
"$PY" - "$OUT/environment.json" "$BUNDLE/manifest.json" <<'EOF'
import datetime, importlib.util, json, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("bench_train", "bench/bench_train.py")
bench = sys.modules["bench_train"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
env = {"recorded_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
       **bench.environment()}
env["optional"] = {name: bench.importable(name) or "ok" for name in bench.OPTIONAL}
manifest = Path(sys.argv[2])
env["bundle"] = json.loads(manifest.read_text()) if manifest.is_file() else None
Path(sys.argv[1]).write_text(json.dumps(env, indent=1) + "\n")
print("gpu_check: " + bench.header().replace("\n", "\ngpu_check: "))
print("gpu_check: packages " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()))
EOF

# 3. the benchmark, under a watchdog: bench_train.py gives each variant what is left of the budget; this outer
# timeout only fires if something hangs outside a variant (records already written stay)
left=$(( BUDGET - ($(date +%s) - started) ))
if [ "$left" -lt 60 ]; then left=60; fi
# shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of options
timeout --signal=TERM --kill-after=15 $(( left + 60 )) "$PY" bench/bench_train.py --mode "$MODE" --no-estimate \
    --budget "$left" --out "$OUT/gpu_check.json" --md-out "$OUT/table.md" ${GPU_CHECK_ARGS:-}
rc=$?
[ $rc -eq 124 ] && echo "gpu_check: the watchdog stopped the benchmark after $(( left + 60 )) s; records so far kept"

# 4. the markdown page: the machine, then the table
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
table = out / "table.md"
try:
    env = json.loads((out / "environment.json").read_text())
    lines = [f"device: {env['device']}; Python {env['python']}, torch {env['packages'].get('torch')} "
             f"(CUDA {env['torch_cuda']}), " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()
                                                         if k != "torch"), ""]
except (OSError, ValueError, KeyError) as err:
    lines = [f"(environment.json unreadable: {err}; each record carries its own environment)", ""]
lines.append(table.read_text() if table.is_file() else "(no variant finished)")
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
table.unlink(missing_ok=True)
EOF
echo "gpu_check: done in $(( $(date +%s) - started )) s (exit $rc); files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
return $rc
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
