"""Parameter files: flat YAML whose keys are the notebooks' parameter names, plus `--set key=value` overrides."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import yaml

from actionft.errors import ActionftError


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `2e-4` (no dot) is a string and `no`, `off`, `yes`, `on` are booleans. Here, as
    in YAML 1.2, only true/false are booleans (`save_strategy: no` is the string "no") and `2e-4` is a float."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: plain data only


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value), the value read as YAML so numbers, booleans and lists keep their type."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ActionftError(f"--set expects key=value, got {text!r}")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ActionftError(f"--set {text!r}: the value is not valid YAML ({err})") from None
    return key.strip(), value


def load_params(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a params file (or start empty) and apply `key=value` overrides in order.

    A file may start from another one with `extends: other.yaml` (a path relative to the file): the other file's
    values first, then this file's.
    """
    params: dict[str, Any] = {}
    if path is not None:
        from actionft.data import read_text_file

        path = Path(path)
        if path.resolve() in _seen:
            raise ActionftError(f"params file {path} extends itself (through {', '.join(map(str, _seen))})")
        text = read_text_file(path, "params file", "see params/ for the shipped ones")
        try:
            loaded = _load_yaml(text) or {}
        except yaml.YAMLError as err:
            raise ActionftError(f"params file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ActionftError(f"params file {path} must be a mapping of name: value, got {type(loaded).__name__}")
        base = loaded.pop("extends", None)
        if base is not None:
            if not isinstance(base, str):
                raise ActionftError(f"params file {path}: extends must be a file name, got {base!r}")
            params.update(load_params(path.parent / base, _seen=(*_seen, path.resolve())))
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
