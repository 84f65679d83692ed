"""Library messages a learner cannot act on, silenced at their source, each with the reason it is harmless.

`install()` runs when the package is imported (a notebook's import cell comes before its setup cell, and bitsandbytes
speaks as it is imported), again in every notebook's setup and in the CLI. Each filter matches one exact message
of one library, so any other warning still shows. `probe_deepspeed_ops()` runs DeepSpeed's compiler probe the way
DeepSpeed means it to run (compiler errors discarded). `use_text_progress()` makes progress bars plain text where no
browser renders widgets (papermill and nbval runs), so executed copies show how far each bar got.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

# (category, regex matched at the start of the message, why it is harmless)
WARNINGS = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "peft reads the deprecated property inside get_peft_model; nothing in this repo or a notebook calls it"),
    (UserWarning, r"Paged optimizers are not supported on CPU",
     "paging moves optimizer state between GPU and CPU memory; on CPU it is already there, and the 8-bit AdamW "
     "of the reference recipe trains unchanged"),
    (UserWarning, r"OMP_NUM_THREADS/MKL_NUM_THREADS unset, we set it at",
     "accelerate sets the thread count to the physical cores itself; that is the right value here"),
]

# (logger name, start of the message, why it is harmless)
LOG_MESSAGES = [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward",
     "an optional prebuilt kernel (the `kernels` package, fetched from the Hub) for 4-bit matmuls on AVX512-BF16 "
     "CPUs; 4-bit layers here run bitsandbytes' generic path on CPU (modeling._generic_cpu_4bit_path), never that "
     "kernel"),
    ("torch.utils.cpp_extension", "No CUDA runtime is found",
     "DeepSpeed imports torch's extension builder to probe its ops; on a CPU-only machine nothing CUDA is built"),
    ("DeepSpeed", "Setting accelerator to CPU",
     "said on every machine without a CUDA GPU: training runs on the CPU, as notebook 04 and the CLI report"),
]

# Set by `actionft run` for the kernels it starts: no browser will render widgets in the executed copies.
HEADLESS_ENV = "ACTIONFT_HEADLESS"


def headless() -> bool:
    """True in a kernel that `actionft run` (papermill) started: widgets will not be rendered."""
    return os.environ.get(HEADLESS_ENV) == "1"


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: list[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_installed = False


def install() -> None:
    """Silence the known harmless messages (idempotent)."""
    global _installed
    for category, message, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if _installed:  # warnings filters may be reset (e.g. by pytest); logging filters stay on their loggers
        return
    by_logger: dict[str, list[str]] = {}
    for name, prefix, _why in LOG_MESSAGES:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logging.getLogger(name).addFilter(_DropMessages(prefixes))
    _installed = True
    if headless():
        use_text_progress()


def use_text_progress() -> None:
    """Make `tqdm.auto` the plain-text bar. A notebook widget bar is stored in an executed copy as its first
    state (`0%| | 0/96`) because its updates go to a browser; a text bar is stored as it ends."""
    import tqdm.auto
    import tqdm.std

    class TextBar(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("mininterval", 5.0)  # each update is one output in the notebook: few of them
            super().__init__(*args, **kwargs)

    tqdm.auto.tqdm = TextBar
    tqdm.auto.trange = lambda *args, **kwargs: TextBar(range(*args), **kwargs)


@contextlib.contextmanager
def discard_fd2():
    """Send what subprocesses write to file descriptor 2 to /dev/null for the duration (Python's own
    `sys.stderr` is unaffected inside a Jupyter kernel, where it is not descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def probe_deepspeed_ops() -> None:
    """Run DeepSpeed's op compatibility probe now, with the compiler's error output discarded.

    On CPU, DeepSpeed's communication backend probes every op on first use by compiling and linking tiny C programs;
    the async-io op's test links against libaio (NVMe offload, unused here), and where libaio is not installed the
    linker prints `/usr/bin/ld: cannot find -laio ... collect2: error`. DeepSpeed silences the compiler by
    redirecting `sys.stderr.fileno()`, which in a Jupyter kernel is not descriptor 2, so in a notebook the message
    got through. The probe's result is cached by DeepSpeed, so this runs it once, quietly, before training does.
    """
    try:
        import torch

        if torch.cuda.is_available():  # the probe only runs on DeepSpeed's CPU path
            return
        import deepspeed.ops
    except ImportError:
        return
    with discard_fd2():
        deepspeed.ops.__compatible_ops__  # noqa: B018 - computes and caches the probe
