"""What bench/gpu_check.sh wrote: check it, and merge it into docs/benchmarks.json.

    python bench/gpu_records.py check OUT_DIR [--bundle .gpu-bundle]   # every part but the GPU worked (rehearsal)
    python bench/gpu_records.py merge OUT_DIR [--into docs/benchmarks.json] [--estimate FILE]

`merge` adds the run (device, environment, records, table) to docs/benchmarks.json, replacing an earlier run of the
same device at the same time, and prints each configuration against the benchmark's targets (fastest >= 5x the
reference's 1.859 samples/s; a <= 24 GB configuration at >= 1.859 samples/s; QLoRA <= 12 GiB) and against the
analytic estimate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = ("gpu_check.json", "gpu_check.md", "environment.json", "gpu_check.log")
MAX_FILES = 8  # what comes back from the GPU machine's $OUT
CONFIGURATIONS = ("reference", "fastest", "lowmem", "qlora")
REFERENCE_SAMPLES_PER_S = 1.859
TARGET_FASTEST = 5 * REFERENCE_SAMPLES_PER_S
LOWMEM_BUDGET_GB = 24.0
QLORA_BUDGET_GIB = 12.0
CUDA_CONTEXT_GB = 1.0  # max_memory_reserved leaves out the CUDA context and fragmentation (about 0.5-1 GB)
# variant -> the row of the analytic estimate (bench_train.py --estimate) that models it
ESTIMATE_ROWS = {
    "b1x8 ckpt zero2 full-logits right": "reference (b1 x 8, ckpt, ZeRO-2, full logits)",
    "b1x8 ckpt left kept": "lowmem (b1 x 8, ckpt, supervised-only logits)",
    "b8x1 left kept": "fastest candidate (b8 x 1, no ckpt, supervised-only)",
    "b8x1 ckpt left kept": "fastest candidate (b8 x 1, ckpt, supervised-only)",
    "b4x2 left kept": "fastest candidate (b4 x 2, no ckpt, supervised-only)",
    "b1x8 ckpt left kept zero2 nf4":
        "qlora: params/gemma4_e4b_qlora.yaml (b1 x 8, ckpt, ZeRO-2, supervised-only logits)",
}


def load(out: Path) -> tuple[list[dict], dict]:
    records = json.loads((out / "gpu_check.json").read_text())
    env = json.loads((out / "environment.json").read_text())
    return records, env


def wheel_versions(bundle: Path) -> dict[str, str]:
    """{package: version} of the wheels in the bundle, read from their own metadata."""
    out = {}
    for wheel in sorted(bundle.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            fields = dict(line.split(": ", 1) for line in z.read(meta).decode().splitlines()[:5] if ": " in line)
        out[fields["Name"].lower().replace("-", "_")] = fields["Version"]
    return out


def check(out: Path, bundle: Path | None) -> list[str]:
    """Problems with a gpu_check.sh output folder (empty: all good)."""
    problems = []
    present = sorted(p.name for p in out.iterdir())
    if len(present) > MAX_FILES:
        problems.append(f"{len(present)} files in {out} (at most {MAX_FILES} come back): {present}")
    problems += [f"{out / name} is missing" for name in FILES if not (out / name).is_file()]
    if problems:
        return problems
    records, env = load(out)
    by_config = {r["configuration"]: r for r in records if "skipped" not in r}
    bundled = wheel_versions(bundle) if bundle is not None and bundle.is_dir() else {}
    for name in CONFIGURATIONS:
        r = by_config.get(name)
        if r is None:
            why = [x.get("skipped") for x in records if x["configuration"] == name]
            # a 4-bit base needs bitsandbytes: without it in the bundle, saying so is the right record
            skipped_for_bnb = all("bitsandbytes unavailable" in w for w in why)
            if name == "qlora" and why and "bitsandbytes" not in bundled and skipped_for_bnb:
                continue
            problems.append(f"{name}: not measured ({why})")
            continue
        if "error" in r:
            problems.append(f"{name}: failed: {r['error']}")
            continue
        if not (r["samples_per_s"] > 0 and math.isfinite(r["loss"])):
            problems.append(f"{name}: samples/s {r['samples_per_s']}, loss {r['loss']}")
        for key in ("device", "torch", "environment", "optimizer", "optimizer_class", "zero_stage",
                    "sdpa_backend_full_attention", "substitutions", "attn_per_submodel"):
            if key not in r:
                problems.append(f"{name}: the record lacks {key}")
        if name == "qlora" and not (r.get("load_in_4bit") and r.get("linears_4bit")):
            problems.append(f"{name}: the base was not 4-bit (load_in_4bit {r.get('load_in_4bit')}, "
                            f"{r.get('linears_4bit')} 4-bit linear layers)")
        if not r.get("sdpa_backend_full_attention"):
            problems.append(f"{name}: no SDPA call seen on the full-attention layers ({r.get('sdpa_backends')})")
        packages = r.get("environment", {}).get("packages", {})
        if r.get("requested_zero_stage") and packages.get("deepspeed") is None:
            if r.get("zero_stage") is not None or not any("deepspeed" in s for s in r.get("substitutions", [])):
                problems.append(f"{name}: DeepSpeed is absent but the record does not say ZeRO was off")
        if "8bit" in r.get("requested_optim", "") and packages.get("bitsandbytes") is None:
            if r.get("optimizer") == r["requested_optim"] or not any("bitsandbytes" in s for s in r["substitutions"]):
                problems.append(f"{name}: bitsandbytes is absent but the record does not say which optimizer ran")
        for package, version in bundled.items():
            if package in packages and packages[package] != version:
                problems.append(f"{name}: ran with {package} {packages.get(package)}, the bundle holds {version}")
    if not (out / "gpu_check.md").read_text().count("| reference |"):
        problems.append(f"{out / 'gpu_check.md'} has no reference row")
    if env.get("device") is None or "packages" not in env:
        problems.append(f"{out / 'environment.json'} lacks the device or the packages")
    elif bundle is not None and not {"transformers", "peft"} <= set(env["packages"]):
        problems.append(f"{out / 'environment.json'} does not list transformers and peft")
    return problems


def verdicts(records: list[dict], estimate: dict | None) -> list[str]:
    lines = []
    ok = {r["configuration"]: r for r in records if "error" not in r and "skipped" not in r}
    if r := ok.get("fastest"):
        lines.append(f"fastest ({r['variant']}): {r['samples_per_s']:.3f} samples/s, target >= {TARGET_FASTEST:.2f}: "
                     + ("met" if r["samples_per_s"] >= TARGET_FASTEST else "NOT met"))
    for r in ok.values():
        gb = (r.get("peak_reserved_gb") or r["peak_mem_gb"]) + CUDA_CONTEXT_GB
        if gb <= LOWMEM_BUDGET_GB and r["samples_per_s"] >= REFERENCE_SAMPLES_PER_S:
            lines.append(f"<= 24 GB at >= 1.859 samples/s: met by {r['configuration']} ({r['variant']}: ~{gb:.1f} GB "
                         f"with the CUDA context, {r['samples_per_s']:.3f} samples/s)")
    if not any(line.startswith("<= 24 GB") for line in lines) and ok:
        lines.append("<= 24 GB at >= 1.859 samples/s: NOT met by any configuration measured")
    if r := ok.get("qlora"):
        gib = (r.get("peak_reserved_gb") or r["peak_mem_gb"]) + CUDA_CONTEXT_GB
        lines.append(f"qlora ({r['variant']}): ~{gib:.1f} GiB with the CUDA context, {r['samples_per_s']:.3f} "
                     f"samples/s, target <= {QLORA_BUDGET_GIB:g} GiB: " + ("met" if gib <= QLORA_BUDGET_GIB
                                                                           else "NOT met"))
    if estimate:
        for r in ok.values():
            row = estimate.get("memory", {}).get(ESTIMATE_ROWS.get(r["variant"], ""), None)
            if row:
                lines.append(f"{r['configuration']} ({r['variant']}): peak {r['peak_mem_gb']:.2f} GiB allocated "
                             f"against {row['total_gib']:.1f} GiB estimated")
    return lines


def merge(out: Path, into: Path, estimate: dict | None) -> dict:
    records, env = load(out)
    doc = json.loads(into.read_text()) if into.is_file() else {
        "about": "GPU runs of bench/gpu_check.sh (bench/bench_train.py --mode e4b); see docs/benchmarks.md",
        "runs": []}
    run = {"device": env["device"], "recorded_utc": env.get("recorded_utc"), "environment": env,
           "records": records, "table": (out / "gpu_check.md").read_text(), "verdicts": verdicts(records, estimate)}
    doc["runs"] = [r for r in doc["runs"]
                   if (r["device"], r.get("recorded_utc")) != (run["device"], run["recorded_utc"])] + [run]
    into.parent.mkdir(parents=True, exist_ok=True)
    into.write_text(json.dumps(doc, indent=1) + "\n")
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="check a gpu_check.sh output folder")
    c.add_argument("out", type=Path)
    c.add_argument("--bundle", type=Path, default=None, help="the bundle the run should have used")
    m = sub.add_parser("merge", help="add a gpu_check.sh output folder to docs/benchmarks.json")
    m.add_argument("out", type=Path)
    m.add_argument("--into", type=Path, default=REPO / "docs" / "benchmarks.json")
    m.add_argument("--estimate", type=Path, default=REPO / "outputs" / "bench" / "bench_estimate.json",
                   help="bench_train.py --estimate's JSON, to compare memory with (skipped when absent)")
    args = p.parse_args(argv)
    if not (args.out / "gpu_check.json").is_file():
        print(f"{args.out / 'gpu_check.json'} does not exist: point at the folder bench/gpu_check.sh wrote ($OUT)",
              file=sys.stderr)
        return 2
    if args.command == "check":
        problems = check(args.out, args.bundle)
        records, env = load(args.out)
        for r in records:
            if "skipped" in r:
                print(f"  {r['configuration']:<9} {r['variant']:<28} skipped: {r['skipped']}")
            elif "error" in r:
                print(f"  {r['configuration']:<9} {r.get('variant', ''):<28} failed: {r['error']}")
            else:
                print(f"  {r['configuration']:<9} {r['variant']:<28} {r['samples_per_s']:.3f} samples/s, optimizer "
                      f"{r['optimizer']}, ZeRO {r['zero_stage'] or 'off'}, SDPA on full attention "
                      f"{'/'.join(r['sdpa_backend_full_attention'])}, transformers "
                      f"{r['environment']['packages'].get('transformers')}")
        for problem in problems:
            print(f"PROBLEM: {problem}", file=sys.stderr)
        print(f"{args.out}: {'OK' if not problems else f'{len(problems)} problem(s)'} ({env['device']})")
        return 1 if problems else 0
    estimate = json.loads(args.estimate.read_text()) if args.estimate and args.estimate.is_file() else None
    run = merge(args.out, args.into, estimate)
    print(run["table"])
    print("\n".join(run["verdicts"]))
    print(f"merged into {args.into}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
