"""The `actionft` command line: one subcommand per stage, each a thin wrapper over a library function.

Only the module of the command being run is imported (`actionft validate` and `--help` never load torch), and every
error meant for people (`ActionftError`, and the `OSError`s of a full disk, a read-only or misplaced output folder)
is printed here as one line with exit code 2 (bad input) or 1 (failure), never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from actionft.errors import ActionftError, os_error

# subcommand -> module that defines `add_parser(subparsers)`; each parser sets `func` to its entry point.
SUBCOMMANDS = {
    "evaluate": "actionft.evaluate",
    "run": "actionft.notebooks",
    "predict": "actionft.infer",
    "train": "actionft.train",
    "tiny-base": "actionft.pretrain",
    "synth": "actionft.synth",
    "validate": "actionft.data",
    "prepare": "actionft.prepare",
    "compare": "actionft.compare",
}
# Commands a module defines besides its own (`actionft.infer` also defines `merge`).
EXTRA_COMMANDS = {"merge": "actionft.infer"}
# The one-line help of each command, for `actionft --help` without importing every module (a test keeps these in
# step with the modules' own parsers).
HELP = {
    "evaluate": "held-out metrics for the base model and base + adapter",
    "run": "execute the notebooks in order with papermill (outputs/<run_name>/notebooks)",
    "predict": "answer for frames or a clip with a fine-tuned adapter",
    "merge": "merge an adapter into its base model (merge_and_unload) and save it",
    "train": "LoRA fine-tuning (HF Trainer + peft + DeepSpeed)",
    "tiny-base": "build and pretrain the tiny offline Gemma 4 used by the embedded default",
    "synth": "generate the embedded action dataset (videos, frames, JSON, metadata)",
    "validate": "check a reference-format dataset and every frame it points to",
    "prepare": "extract frames from raw videos into a reference-format dataset",
    "compare": "line up training runs: differing parameters, losses, held-out metrics",
}


def build_parser(command: str | None = None, lazy: bool = False) -> argparse.ArgumentParser:
    """The full parser; with `lazy`, only `command`'s module is imported and the others get a stub (name + help)."""
    parser = argparse.ArgumentParser(prog="actionft", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    owners = {**SUBCOMMANDS, **{k: v for k, v in EXTRA_COMMANDS.items() if v in SUBCOMMANDS.values()}}
    for name, module in SUBCOMMANDS.items():
        if name in sub.choices:
            continue
        if not lazy or owners.get(command) == module:
            importlib.import_module(module).add_parser(sub)
        else:  # the module's commands in the order it adds them
            for other in [name, *(k for k, v in EXTRA_COMMANDS.items() if v == module)]:
                sub.add_parser(other, help=HELP.get(other))
    return parser


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The DeepSpeed launcher adds `--local_rank=N` (it also sets LOCAL_RANK, which is what we read)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    from actionft import quiet

    quiet.install()
    argv = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(_command_of(argv), lazy=True).parse_args(argv)
        return int(args.func(args) or 0)
    except OSError as exc:  # raised outside the places that name what they were doing: still one line
        err = os_error(exc)
    except ActionftError as exc:
        err = exc
    print(f"error: {err}", file=sys.stderr)
    return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
