"""Running the numbered notebooks headless with papermill, and keeping the committed copies clean.

`actionft run --params FILE` executes `notebooks/NN_*.ipynb` in order; each notebook receives the params it declares
in its `parameters` cell. Executed copies go to `outputs/<run_name>/notebooks/`, never over the sources.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from actionft.errors import ActionftError
from actionft.paths import repo_root, resolve_path


def notebook_dir() -> Path:
    return repo_root() / "notebooks"


def list_notebooks(selection: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in order, optionally only those whose number or name is in `selection`."""
    found = sorted(notebook_dir().glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise ActionftError(f"no numbered notebooks in {notebook_dir()}")
    if not selection:
        return found
    chosen = [nb for nb in found if any(nb.name.startswith(s) or nb.stem == s for s in selection)]
    missing = [s for s in selection if not any(nb.name.startswith(s) or nb.stem == s for nb in found)]
    if missing:
        raise ActionftError(f"no notebook matches {missing}; available: {[nb.stem for nb in found]}")
    return chosen


def notebook_parameters(path: Path) -> dict[str, Any]:
    """Names and defaults of a notebook's `parameters` cell (as papermill sees them)."""
    import papermill

    return {name: info["default"] for name, info in papermill.inspect_notebook(str(path)).items()}


def run_notebooks(params: dict[str, Any], selection: list[str] | None = None, kernel: str = "python3",
                  cell_timeout: int = 3600,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Execute the notebooks in order with the params each one declares; stop at the first failure.

    Every parameter is checked (name, type, range: actionft.config) before the first notebook starts."""
    import os

    from actionft.quiet import HEADLESS_ENV

    # the kernels inherit this: no browser renders widget bars in an executed copy, so bars are text there
    before = os.environ.get(HEADLESS_ENV)
    os.environ[HEADLESS_ENV] = "1"
    try:
        return _run_notebooks(params, selection, kernel, cell_timeout, progress)
    finally:
        if before is None:
            os.environ.pop(HEADLESS_ENV, None)
        else:
            os.environ[HEADLESS_ENV] = before


def _run_notebooks(params: dict[str, Any], selection: list[str] | None, kernel: str, cell_timeout: int,
                   progress: bool) -> list[dict[str, Any]]:
    import papermill

    from actionft import config

    resolved = config.validate(params)
    # Each notebook gets every parameter it declares as the configuration resolves it (so a params file that names
    # its own data_path turns the generated dataset off everywhere), except the evaluation/prepare settings a file
    # leaves unset: their None means "the notebook's own default".
    values = {k: v for k, v in resolved.items() if k in params or v is not None}

    run_name = resolved["run_name"]
    out_dir = resolve_path(resolved["output_root"]) / run_name / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for nb in list_notebooks(selection):
        declared = notebook_parameters(nb)
        passed = {k: v for k, v in values.items() if k in declared}
        start = time.time()
        print(f"==> {nb.name} ({len(passed)} parameters) -> {out_dir / nb.name}", flush=True)
        try:
            papermill.execute_notebook(
                str(nb), str(out_dir / nb.name), parameters=passed, kernel_name=kernel, cwd=str(nb.parent),
                progress_bar=progress, log_output=False, execution_timeout=cell_timeout,
            )
        except papermill.PapermillExecutionError as err:
            raise ActionftError(
                f"{nb.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                f"  the executed copy with the traceback is {out_dir / nb.name}"
            ) from None
        tidy_executed_copy(out_dir / nb.name)
        seconds = round(time.time() - start, 1)
        results.append({"notebook": nb.name, "seconds": seconds})
        print(f"    done in {seconds} s", flush=True)
    (out_dir / "run_summary.json").write_text(json.dumps(results, indent=1))
    return results


def collapse_carriage_returns(text: str) -> str:
    """Stream text as a terminal leaves it: on each line, what follows the last carriage return. A text progress bar
    becomes its final state; a bar that erased itself (leave=False) disappears."""
    lines = []
    for line in text.split("\n"):
        if "\r" in line:
            line = next((part for part in reversed(line.split("\r")) if part), "")
            if not line.strip():
                continue
        lines.append(line)
    return "\n".join(lines)


def tidy_executed_copy(path: Path) -> None:
    """Merge each cell's consecutive stream outputs (a text bar arrives as one output per update) and keep what a
    terminal would show, so an executed copy reads well in any viewer."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.outputs:
            if out.output_type == "stream" and merged and merged[-1].output_type == "stream" \
                    and merged[-1].name == out.name:
                merged[-1].text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                out.text = collapse_carriage_returns(out.text)
        cell.outputs = [o for o in merged if not (o.output_type == "stream" and not o.text.strip())]
    nbformat.write(nb, str(path))


# -- keeping committed notebooks clean ------------------------------------------------------------------------
# What every committed notebook carries as notebook metadata. JupyterLab rewrites both when it opens or saves a
# notebook (display name "Python 3 (ipykernel)", language_info with the local Python version, codemirror mode...),
# so cleaning resets them instead of keeping whatever the last editor wrote.
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python"}
KEEP_METADATA = {"kernelspec", "language_info"}


def clean_text(text: str) -> str:
    """A notebook's JSON without outputs, execution counts and volatile metadata, in the committed format.

    Idempotent: cleaning clean text returns it unchanged. This is the git filter's `clean` step
    (`python -m actionft.notebooks clean --stdin`), so what JupyterLab saves never reaches a commit.
    """
    import nbformat

    nb = nbformat.reads(text, as_version=4)
    nb.metadata = nbformat.from_dict({"kernelspec": dict(KERNELSPEC), "language_info": dict(LANGUAGE_INFO)})
    for cell in nb.cells:
        cell.metadata = nbformat.from_dict({k: v for k, v in cell.metadata.items() if k == "tags"})
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        elif "attachments" in cell and not cell.attachments:
            del cell["attachments"]
    return nbformat.writes(nb) + "\n"  # JupyterLab and the committed files end with a newline


def clean_notebook(path: Path) -> bool:
    """Clean a notebook file in place (see `clean_text`); return True if the file changed."""
    before = Path(path).read_text()
    after = clean_text(before)
    if after != before:
        Path(path).write_text(after)
    return after != before


def dirty_notebooks(paths: list[Path], texts: list[str] | None = None) -> list[str]:
    """Notebooks that carry outputs, execution counts or volatile metadata (one line per notebook).

    `texts`, when given, are the notebooks' contents (e.g. what git would commit) and `paths` only name them.
    """
    import nbformat

    dirty = []
    for i, path in enumerate(paths):
        nb = nbformat.reads(texts[i] if texts is not None else Path(path).read_text(), as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
                dirty.append(f"{path}: code cell with outputs")
                break
            if set(cell.metadata) - {"tags"}:
                dirty.append(f"{path}: cell metadata {sorted(set(cell.metadata) - {'tags'})}")
                break
        if set(nb.metadata) - KEEP_METADATA:
            dirty.append(f"{path}: notebook metadata {sorted(set(nb.metadata) - KEEP_METADATA)}")
        elif nb.metadata.get("kernelspec") != KERNELSPEC or nb.metadata.get("language_info") != LANGUAGE_INFO:
            dirty.append(f"{path}: kernelspec/language_info rewritten (expected {KERNELSPEC}, {LANGUAGE_INFO})")
    return dirty


def committed_text(path: Path) -> str:
    """What git would commit for `path`: its staged blob (`git show :path`, after the nbstrip filter), or the file
    itself outside a git checkout or when the file is not tracked."""
    import subprocess

    path = Path(path).resolve()
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path.parent, capture_output=True,
                             text=True, check=True).stdout.strip()
        rel = path.relative_to(Path(top).resolve()).as_posix()
        return subprocess.run(["git", "show", f":{rel}"], cwd=top, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, ValueError, subprocess.CalledProcessError):
        return path.read_text()


def add_parser(sub: argparse._SubParsersAction) -> None:
    from actionft.params import add_params_args

    p = sub.add_parser("run", help="execute the notebooks in order with papermill (outputs/<run_name>/notebooks)")
    add_params_args(p, required=True)
    p.add_argument("--notebooks", nargs="*", metavar="NN", help="only these notebooks (numbers or names)")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3 = this environment)")
    p.set_defaults(func=_cli_run)


def _cli_run(args: argparse.Namespace) -> int:
    from actionft.params import params_from_args

    from actionft import config

    params = params_from_args(args)
    run = config.validate(params, ("run",))  # run_name and output_root with their defaults
    start = time.time()
    results = run_notebooks(params, args.notebooks, args.kernel)
    print(f"ran {len(results)} notebook(s) in {time.time() - start:.0f} s: "
          + ", ".join(f"{r['notebook']} {r['seconds']:.0f}s" for r in results))
    print_run_results(resolve_path(run["output_root"]) / run["run_name"], since=start)
    return 0


def print_run_results(run_dir: Path, since: float = 0.0) -> None:
    """End a run with its headline numbers: held-out accuracy (notebook 05) and the before/after metric table
    (notebook 06), when this run wrote them."""
    from actionft.metrics import summary_table

    fresh = lambda name: (run_dir / name).is_file() and (run_dir / name).stat().st_mtime >= since  # noqa: E731
    if fresh("accuracy.json"):
        acc = json.loads((run_dir / "accuracy.json").read_text())
        print(f"held-out accuracy (n={acc['n']}): base {acc['base']:.3f}, fine-tuned {acc['finetuned']:.3f}, "
              f"chance {acc['chance']:.3f}   [{run_dir / 'accuracy.json'}]")
    if fresh("metrics.json"):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        print(f"base vs fine-tuned on {metrics['n']} held-out clips   [{run_dir / 'metrics.json'}]")
        print(summary_table({"base": metrics["base"], "finetuned": metrics["finetuned"]}))


def main(argv: list[str] | None = None) -> int:
    """`clean NOTEBOOK...` cleans files in place, `clean --stdin` filters stdin to stdout (the git filter),
    `check [--staged] NOTEBOOK...` fails when a notebook (or what git would commit for it) is not clean."""
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m actionft.notebooks {clean --stdin | clean NOTEBOOK... | check [--staged] NOTEBOOK...}"
    if not argv or argv[0] not in ("clean", "check"):
        print(usage, file=sys.stderr)
        return 2
    if argv[0] == "clean" and argv[1:] == ["--stdin"]:
        text = sys.stdin.read()
        try:
            sys.stdout.write(clean_text(text))
        except Exception as err:  # noqa: BLE001 - a filter must never lose the user's file: pass it through
            print(f"actionft.notebooks clean --stdin: not a notebook ({err}); passed through unchanged",
                  file=sys.stderr)
            sys.stdout.write(text)
        return 0
    staged = argv[0] == "check" and "--staged" in argv
    paths = [Path(p) for p in argv[1:] if p != "--staged"]
    if not paths:
        print(usage, file=sys.stderr)
        return 2
    if argv[0] == "clean":
        changed = [str(p) for p in paths if clean_notebook(p)]
        print(f"cleaned {len(changed)} notebook(s)" + (": " + ", ".join(changed) if changed else ""))
        return 0
    dirty = dirty_notebooks(paths, [committed_text(p) for p in paths] if staged else None)
    for line in dirty:
        print(line + ("   (fix: make setup, then git add the notebook again)" if staged else
                      "   (fix: make clean-notebooks)"))
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())
