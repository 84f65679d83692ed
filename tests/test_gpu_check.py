"""The pieces of the one-call GPU check that run in seconds: the bundle's pins and size, the benchmark on a machine
without DeepSpeed or bitsandbytes, the SDPA probe, the time budget and the output checker. The whole path (fresh
environment, bundle, bench/gpu_check.sh in tiny mode) is `make gpu-rehearse`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("bench_train_gpu", REPO / "bench" / "bench_train.py")


@pytest.fixture(scope="module")
def bundle():
    return _load("gpu_bundle", REPO / "bench" / "gpu_bundle.py")


@pytest.fixture(scope="module")
def records():
    return _load("gpu_records", REPO / "bench" / "gpu_records.py")


def test_bundle_takes_the_projects_pins(bundle):
    pins = bundle.pins()
    for name in bundle.REQUIRED + bundle.OPTIONAL:
        assert name in pins, f"{name} is not pinned in pyproject.toml"
    assert pins["transformers"].startswith("transformers==5.")
    # the tree alone leaves room for the required wheels (~18 MiB) under the 60 MiB limit
    assert bundle.tree_bytes() < 30 * bundle.MIB


def test_bundle_size_check_fails_without_the_wheels(bundle, tmp_path, capsys):
    assert bundle.main(["--size-only", "--dest", str(tmp_path)]) == 1
    assert "lacks transformers" in capsys.readouterr().err
    assert bundle.main(["--size-only", "--dest", str(tmp_path), "--limit-mib", "0.5"]) == 1
    assert "too large" in capsys.readouterr().err


def test_trimmed_wheel_keeps_the_named_libraries_and_a_record_of_what_it_holds(bundle, tmp_path):
    import hashlib
    import zipfile

    source = tmp_path / "orig" / "pkg-1.0-py3-none-manylinux_2_24_x86_64.whl"
    source.parent.mkdir()
    files = {"pkg/__init__.py": b"x = 1\n", "pkg/libpkg_cpu.so": b"cpu", "pkg/libpkg_cuda118.so": b"old" * 100,
             "pkg/libpkg_cuda130.so": b"13.0", "pkg/libpkg_cuda132.so": b"13.2", "pkg/libpkg_rocm72.so": b"rocm"}
    record = "".join(f"{name},sha256={hashlib.sha256(data).hexdigest()},{len(data)}\n" for name, data in files.items())
    with zipfile.ZipFile(source, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("pkg-1.0.dist-info/RECORD", record + "pkg-1.0.dist-info/RECORD,,\n")
    out = tmp_path / source.name
    info = bundle.trim_wheel(source, out, ("libpkg_cpu", "libpkg_cuda13"))
    held = set(zipfile.ZipFile(out).namelist())
    assert held == {"pkg/__init__.py", "pkg/libpkg_cpu.so", "pkg/libpkg_cuda130.so", "pkg/libpkg_cuda132.so",
                    "pkg-1.0.dist-info/RECORD"}
    listed = {line.split(",")[0] for line in zipfile.ZipFile(out).read("pkg-1.0.dist-info/RECORD").decode().split()}
    assert listed == held
    assert info["dropped"] == ["pkg/libpkg_cuda118.so", "pkg/libpkg_rocm72.so"]
    assert info["original_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    # the real bitsandbytes wheel: the CPU library and those for the GPU machine's CUDA 13 stay
    assert bundle.KEEP_NATIVE["bitsandbytes"] == ("libbitsandbytes_cpu", "libbitsandbytes_cuda13")


def test_without_deepspeed_and_bitsandbytes_the_run_says_what_it_used(bench, monkeypatch):
    monkeypatch.setattr(bench, "importable", lambda name: f"ModuleNotFoundError: No module named '{name}'")
    params, notes = bench.fit_to_machine({**bench.COMMON, "deepspeed": bench.ZERO2})
    assert params["deepspeed"] is None and params["optim"] == "adamw_torch"
    assert any("deepspeed" in n and "ZeRO-2 off" in n for n in notes)
    assert any("bitsandbytes" in n and "paged_adamw_8bit" in n for n in notes)
    monkeypatch.setattr(bench, "importable", lambda name: None)
    params, notes = bench.fit_to_machine({**bench.COMMON, "deepspeed": bench.ZERO2})
    assert params["deepspeed"] == bench.ZERO2 and params["optim"] == "paged_adamw_8bit" and notes == []
    assert bench.zero_stage(bench.ZERO2) == 2


def test_sdpa_probe_records_the_kernel_per_head_dim_and_changes_nothing(bench):
    import torch.nn.functional as F

    q512, q64 = torch.randn(1, 2, 5, 512), torch.randn(1, 2, 5, 64)
    expected = F.scaled_dot_product_attention(q512, q512, q512, is_causal=True)
    with bench.SdpaProbe() as probe:
        got = F.scaled_dot_product_attention(q512, q512, q512, is_causal=True)
        F.scaled_dot_product_attention(q64, q64, q64)
        F.scaled_dot_product_attention(q64, q64, q64)
    assert F.scaled_dot_product_attention is not probe  # restored
    assert torch.equal(got, expected)
    assert set(probe.calls) == {512, 64} and sum(probe.calls[64].values()) == 2
    [backend] = probe.backends([512])
    assert backend in {"MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"}


def test_budget_too_small_skips_every_variant_and_still_writes_records(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "t.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO / 'lib'}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_train.py"), "--mode", "tiny", "--no-estimate",
                           "--pool", "1", "--max-soft-tokens", "70", "--budget", "1", "--min-variant-s", "600",
                           "--out", str(out), "--md-out", str(md)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 1 and "no variant was measured" in proc.stderr
    recs = json.loads(out.read_text())
    assert [r["configuration"] for r in recs] == ["reference", "fastest", "lowmem", "qlora"]
    assert all(r["skipped"].startswith("time budget") for r in recs)
    assert md.read_text().startswith("| configuration |")


def _record(configuration: str, **overrides) -> dict:
    packages = {"torch": "2.11.0", "transformers": "5.23.0", "deepspeed": None, "bitsandbytes": None}
    record = {"configuration": configuration, "variant": "v", "samples_per_s": 1.0, "loss": 6.5, "device": "GPU",
              "torch": "2.11.0", "environment": {"packages": packages}, "optimizer": "adamw_torch",
              "optimizer_class": "torch.optim.adamw.AdamW", "zero_stage": None, "requested_zero_stage": 2,
              "requested_optim": "paged_adamw_8bit", "sdpa_backend_full_attention": ["EFFICIENT_ATTENTION"],
              "substitutions": ["deepspeed unavailable (x): ZeRO-2 off", "bitsandbytes unavailable (x): adamw_torch"],
              "attn_per_submodel": {"text_config": "sdpa"}, "peak_mem_gb": 20.0, "peak_reserved_gb": 21.0}
    return {**record, **overrides}


def _write(out: Path, recs: list[dict]) -> Path:
    out.mkdir()
    (out / "gpu_check.json").write_text(json.dumps(recs))
    (out / "environment.json").write_text(json.dumps({"device": "GPU", "packages": {}, "recorded_utc": "t"}))
    (out / "gpu_check.md").write_text("| reference | v |\n")
    (out / "gpu_check.log").write_text("")
    return out


QLORA = {"load_in_4bit": True, "linears_4bit": 294}
NO_BNB = {"configuration": "qlora", "variant": "v", "skipped": "bitsandbytes unavailable (x): a 4-bit base needs it"}


def test_checker_accepts_a_complete_run_and_names_what_is_wrong(records, tmp_path):
    three = [_record(c) for c in ("reference", "fastest", "lowmem")]
    good = _write(tmp_path / "good", three + [_record("qlora", **QLORA)])
    assert records.check(good, None) == []
    # without bitsandbytes in the bundle, a qlora record that says why it was skipped is the right one
    assert records.check(_write(tmp_path / "no_bnb", three + [NO_BNB]), None) == []
    assert any(p.startswith("qlora: not measured") for p in records.check(_write(tmp_path / "no_qlora", three), None))
    not_4bit = _write(tmp_path / "not_4bit", [_record(c) for c in ("reference", "fastest", "lowmem", "qlora")])
    assert any("qlora: the base was not 4-bit" in p for p in records.check(not_4bit, None))
    bad = _write(tmp_path / "bad", [_record("reference", zero_stage=2, substitutions=[]),
                                    {"configuration": "fastest", "variant": "v", "error": "CUDA out of memory"},
                                    _record("lowmem", sdpa_backend_full_attention=[])])
    problems = records.check(bad, None)
    assert any("reference: DeepSpeed is absent" in p for p in problems)
    assert any("fastest: failed: CUDA out of memory" in p for p in problems)
    assert any("lowmem: no SDPA call seen" in p for p in problems)


def test_merge_adds_the_run_once_and_judges_the_targets(records, tmp_path):
    out = _write(tmp_path / "run", [_record("reference", samples_per_s=2.0),
                                    _record("fastest", samples_per_s=10.0, peak_reserved_gb=60.0),
                                    _record("lowmem", samples_per_s=1.9, peak_reserved_gb=20.0),
                                    _record("qlora", samples_per_s=1.0, peak_reserved_gb=10.5, **QLORA)])
    into = tmp_path / "benchmarks.json"
    run = records.merge(out, into, None)
    records.merge(out, into, None)
    assert len(json.loads(into.read_text())["runs"]) == 1
    assert run["verdicts"][0].endswith("target >= 9.29: met")
    assert any("met by lowmem" in v for v in run["verdicts"])
    assert not any("met by fastest" in v for v in run["verdicts"])
    assert any(v.startswith("qlora (v): ~11.5 GiB") and v.endswith("<= 12 GiB: met") for v in run["verdicts"])
