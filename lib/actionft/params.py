"""Parameter files: flat YAML whose keys are the notebooks' parameter names, plus `--set key=value` overrides."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from actionft.errors import ActionftError


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value), the value read as YAML so numbers, booleans and lists keep their type."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ActionftError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ActionftError(f"--set {text!r}: the value is not valid YAML ({err})") from None
    return key.strip(), value


def load_params(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a params file (or start empty) and apply `key=value` overrides in order."""
    params: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ActionftError(f"params file {path} does not exist; see params/ for the shipped ones")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ActionftError(f"params file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ActionftError(f"params file {path} must be a mapping of name: value, got {type(loaded).__name__}")
        params.update(loaded)
    for text in overrides:
        key, value = parse_override(text)
        params[key] = value
    return params


def add_params_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """Add `--params FILE` and repeatable `--set key=value` to a subcommand."""
    parser.add_argument("--params", required=required, metavar="FILE", help="YAML parameter file (see params/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one parameter, same names as the params files (repeatable)",
    )


def params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return load_params(args.params, args.overrides)
