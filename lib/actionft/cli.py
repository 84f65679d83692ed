"""The `actionft` command line: one subcommand per stage, each a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import importlib
import sys

from actionft.errors import ActionftError

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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actionft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


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
    args = build_parser().parse_args(strip_launcher_args(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args) or 0)
    except ActionftError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
