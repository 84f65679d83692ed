"""The messages a learner cannot act on are silenced, exactly those, and at their source."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from actionft import quiet


def test_known_warnings_are_silenced_and_others_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("Paged optimizers are not supported on CPU. Falling back to non-paged optimizer behavior.")
        warnings.warn("OMP_NUM_THREADS/MKL_NUM_THREADS unset, we set it at 2 to improve oob performance.")
        warnings.warn("`something_else` is deprecated", FutureWarning)
        warnings.warn("Paged optimizers are not supported on CPU", DeprecationWarning)  # other category: kept
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated",
                                                "Paged optimizers are not supported on CPU"]


@pytest.mark.parametrize(("logger", "message"), [(name, prefix) for name, prefix, _ in quiet.LOG_MESSAGES])
def test_known_log_messages_are_silenced_and_others_are_not(logger, message, caplog):
    quiet.install()
    log = logging.getLogger(logger)
    with caplog.at_level(logging.WARNING):
        log.warning(message + " %s", "(details)")
        log.warning("another warning from %s", logger)
    assert [r.getMessage() for r in caplog.records] == [f"another warning from {logger}"]


def test_every_filter_says_why_it_is_harmless():
    for *_, why in quiet.WARNINGS + quiet.LOG_MESSAGES:
        assert len(why.split()) >= 8, why


def test_paged_optimizer_on_cpu_trains_without_the_warning():
    """The real source: bitsandbytes' paged 8-bit AdamW stepping on CPU parameters."""
    import torch

    bnb = pytest.importorskip("bitsandbytes")
    quiet.install()
    weight = torch.nn.Parameter(torch.randn(64, 64))
    opt = bnb.optim.PagedAdamW8bit([weight], lr=1e-2)
    before = weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install()
        weight.sum().backward()
        opt.step()
    assert not [w for w in caught if "Paged" in str(w.message)], [str(w.message) for w in caught]
    assert not torch.equal(before, weight.detach())  # it still trains


def test_text_progress_replaces_the_widget_bar():
    code = textwrap.dedent("""
        import tqdm.auto, tqdm.notebook, tqdm.std
        from actionft import quiet
        quiet.install()
        print(issubclass(tqdm.auto.tqdm, tqdm.std.tqdm) and tqdm.auto.tqdm is not tqdm.notebook.tqdm)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), quiet.HEADLESS_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


# A Jupyter kernel's sys.stderr is not file descriptor 2 (ipykernel forwards descriptor 2 separately), which is why
# DeepSpeed's own silencing of its compiler probe misses there. This mimics that in a plain process.
KERNEL_LIKE = textwrap.dedent("""
    import io, os, sys
    class KernelStderr(io.TextIOWrapper):
        pass
    sys.stderr = KernelStderr(os.fdopen(os.dup(2), "wb"), write_through=True)
    from actionft import quiet
    quiet.install()
    if sys.argv[1] == "probe":
        quiet.probe_deepspeed_ops()
    import deepspeed.ops
    print(sorted(k for k, v in deepspeed.ops.__compatible_ops__.items() if v))
""")


@pytest.mark.slow
def test_deepspeed_probe_prints_no_linker_error_in_a_kernel():
    torch = pytest.importorskip("torch")
    pytest.importorskip("deepspeed")
    if torch.cuda.is_available():
        pytest.skip("DeepSpeed probes its ops this way only on CPU")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    runs = {mode: subprocess.run([sys.executable, "-c", KERNEL_LIKE, mode], env=env, capture_output=True,
                                 text=True, timeout=300)
            for mode in ("plain", "probe")}
    assert runs["probe"].returncode == 0, runs["probe"].stderr[-2000:]
    assert "cannot find -laio" not in runs["probe"].stderr and "collect2" not in runs["probe"].stderr
    assert "No CUDA runtime is found" not in runs["probe"].stderr
    assert runs["probe"].stdout == runs["plain"].stdout  # the same ops found compatible
    if "cannot find -laio" not in runs["plain"].stderr:
        pytest.skip("libaio is installed here: the linker has nothing to complain about")
