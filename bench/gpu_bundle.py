"""Download the wheels the GPU benchmark needs on a bare GPU machine, and check that what travels fits.

The GPU machine brings Python 3.12, its own torch (CUDA build), an older transformers, peft, accelerate, safetensors
and tokenizers, and no DeepSpeed, bitsandbytes or PyAV; it is offline and cannot `pip install -e .`. What reaches it
is the working tree plus a few ignored paths, 64 MiB in all. This script fetches, for CPython 3.12 on manylinux
x86_64, exactly the wheels whose versions the project pins and the machine's own may not match:

  transformers, peft, accelerate, tokenizers, safetensors (pyproject.toml pins), and huggingface-hub 1.33.0 (the
  pinned transformers needs >= 1.31; the machine's older transformers holds a 1.x hub, which may be older than that.
  1.33 is the last 1.x: it talks HTTP through httpx like the machine's own, where 2.x needs httpx2, a package the
  machine does not have), and pydantic with its own dependencies (pydantic-core, annotated-types,
  typing-inspection, typing-extensions; the project's configuration needs it, and nothing in the machine's image
  guarantees it)

and then bitsandbytes (the 8-bit optimizer and the 4-bit base of QLoRA) only if the total stays under the limit.
Its wheel carries native libraries for every CUDA, ROCm and XPU release (41 MiB); bitsandbytes loads the library of
the CUDA major version torch was built with, and the machine's torch is built for CUDA 13, so the bundle's copy keeps
the CPU library and the CUDA 13.x ones (~7 MiB) and drops the rest (same name and version; RECORD lists what it holds;
the manifest names what was dropped and the original wheel's sha256). torch stays the machine's
own (GBs, built for its CUDA); numpy, pillow, pyyaml, regex, tqdm, typer come with the machine's transformers and
torch; DeepSpeed needs a build and PyAV is not used by the benchmark: the benchmark records what it ran without.

    python bench/gpu_bundle.py                 # -> .gpu-bundle/ (make gpu-bundle)
    python bench/gpu_bundle.py --size-only     # only print what would travel

Exit status 1 when tree + bundle exceed --limit-mib (default 60).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the device's Python and platform (manylinux tags newest first, so pip takes the wheel the device would take)
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux2014_x86_64")
REQUIRED = ("transformers", "peft", "accelerate", "tokenizers", "safetensors", "pydantic")
# pydantic (the project's typed configuration) comes with the dependencies its pinned release names, exactly
WITH_DEPENDENCIES = ("pydantic",)
HUB = "huggingface-hub==1.33.0"  # not pinned in pyproject.toml; see the module docstring
OPTIONAL = ("bitsandbytes",)  # carried only when the total stays under the limit
# native libraries an optional wheel keeps (file names starting so); the others are for hardware the machine lacks
KEEP_NATIVE = {"bitsandbytes": ("libbitsandbytes_cpu", "libbitsandbytes_cuda13")}
MIB = 2**20


def pins(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """{name: "name==version"} for the exact pins of pyproject.toml's dependencies."""
    text = pyproject.read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    return {m.group(1).lower(): f"{m.group(1)}=={m.group(2)}" for m in re.finditer(r'"([\w.-]+)==([\w.+-]+)"', deps)}


def tree_bytes() -> int:
    """Bytes of what travels without being named: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    files = {REPO / name for name in out.decode().split("\0") if name}
    return sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())


def download(requirements: list[str], dest: Path, deps: bool = False) -> list[Path]:
    """pip download of exactly these `name==version` wheels for CPython 3.12 manylinux x86_64; with `deps`, also
    the dependencies pip resolves for them (on the same platform)."""
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", PYTHON_VERSION, "--dest", str(dest), "--disable-pip-version-check", "--progress-bar",
           "off"] + ([] if deps else ["--no-deps"])
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    proc = subprocess.run(cmd + requirements, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.stdout[-500:], file=sys.stderr)
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout)
    log = proc.stdout
    # pip names every wheel it saved or found already there ("Saved ./x.whl", "File was already downloaded /x.whl")
    names = {Path(word).name for line in log.splitlines() for word in line.split() if word.endswith(".whl")}
    files = [dest / name for name in names if (dest / name).is_file()]
    if not files:
        raise subprocess.CalledProcessError(1, cmd, log)
    return sorted(set(files))


def trim_wheel(source: Path, dest: Path, keep: tuple[str, ...]) -> dict:
    """Copy wheel `source` to `dest` without the native libraries (`*.so`) whose file names do not start with one of
    `keep`; RECORD is rewritten to list what the copy holds (the kept files' hashes are unchanged). Returns what was
    dropped, for the manifest."""
    dropped: list[str] = []
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        names = zin.namelist()
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if ".so" in base and not base.startswith(keep):
                dropped.append(name)
        for name in names:
            if name in dropped:
                continue
            data = zin.read(name)
            if name.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",", 1)[0] not in dropped).encode()
            zout.writestr(zin.getinfo(name), data)
    return {"trimmed_from": source.name, "original_bytes": source.stat().st_size,
            "original_sha256": hashlib.sha256(source.read_bytes()).hexdigest(), "dropped": sorted(dropped)}


def wheel_name(path: Path) -> str:
    return path.name.split("-")[0].lower().replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", default=".gpu-bundle", help="folder for the wheels (git-ignored; it travels as `carry`)")
    p.add_argument("--limit-mib", type=float, default=60.0, help="fail above this total (tree + bundle)")
    p.add_argument("--no-optional", action="store_true", help="leave bitsandbytes out even if it fits")
    p.add_argument("--size-only", action="store_true", help="download nothing; print the size of what would travel")
    args = p.parse_args(argv)
    dest = Path(args.dest) if Path(args.dest).is_absolute() else REPO / args.dest
    dest.mkdir(parents=True, exist_ok=True)
    pinned = pins()
    tree = tree_bytes()
    notes: list[str] = []

    if not args.size_only:
        required = [pinned[name] for name in REQUIRED if name not in WITH_DEPENDENCIES] + [HUB]
        wanted = download(required, dest)
        wanted += download([pinned[name] for name in WITH_DEPENDENCIES], dest, deps=True)
        trimmed: dict[str, dict] = {}
        for name in OPTIONAL if not args.no_optional else ():
            spec = pinned.get(name, name)
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    original = download([spec], Path(tmp))
                except subprocess.CalledProcessError:
                    notes.append(f"{spec}: no wheel could be downloaded for CPython {PYTHON_VERSION} manylinux x86_64")
                    continue
                extra = []
                for wheel in original:
                    if name in KEEP_NATIVE:
                        trimmed[wheel.name] = trim_wheel(wheel, dest / wheel.name, KEEP_NATIVE[name])
                    else:
                        (dest / wheel.name).write_bytes(wheel.read_bytes())
                    extra.append(dest / wheel.name)
            total = tree + sum(w.stat().st_size for w in wanted + extra)
            if total > args.limit_mib * MIB:
                notes.append(f"{spec}: left out, {sum(w.stat().st_size for w in extra) / MIB:.1f} MiB would bring "
                             f"the total to {total / MIB:.1f} MiB (limit {args.limit_mib:g}); the benchmark runs "
                             "a torch AdamW instead of the 8-bit one, skips qlora, and records both")
                for w in extra:
                    w.unlink()
            else:
                wanted += extra
        # one wheel per package: drop anything else in the folder (other versions, packages no longer wanted)
        keep = {w.name for w in wanted}
        for w in dest.glob("*.whl"):
            if w.name not in keep:
                w.unlink()
        manifest = {
            "python": PYTHON_VERSION, "platforms": list(PLATFORMS),
            "wheels": [{"file": w.name, "bytes": w.stat().st_size,
                        "sha256": hashlib.sha256(w.read_bytes()).hexdigest(), **trimmed.get(w.name, {})}
                       for w in sorted(wanted)],
            "left_out": notes,
        }
        (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    bundle = sorted(dest.glob("*.whl"))
    bundle_bytes = sum(w.stat().st_size for w in bundle) + sum(f.stat().st_size for f in dest.glob("*.json"))
    for w in bundle:
        print(f"  {w.stat().st_size / MIB:6.2f} MiB  {w.name}"
              + (f"  (native libraries: {', '.join(KEEP_NATIVE[wheel_name(w)])}* only)"
                 if wheel_name(w) in KEEP_NATIVE else ""))
    for note in notes:
        print(f"  (not carried) {note}")
    total = tree + bundle_bytes
    rel = dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest
    print(f"what travels: working tree {tree / MIB:.2f} MiB + {rel}/ {bundle_bytes / MIB:.2f} MiB = "
          f"{total / MIB:.2f} MiB (limit {args.limit_mib:g} MiB)")
    if total > args.limit_mib * MIB:
        print(f"too large: {total / MIB:.2f} MiB > {args.limit_mib:g} MiB; leave something out "
              f"(--no-optional) or make the tree smaller", file=sys.stderr)
        return 1
    missing = [name for name in REQUIRED if not any(wheel_name(w) == name for w in bundle)]
    if missing:
        print(f"{rel}/ lacks {', '.join(missing)}: run `make gpu-bundle` (it needs the package index)",
              file=sys.stderr)
        return 1
    print(f"carry: {rel}  (the GPU command: bash bench/gpu_check.sh)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
