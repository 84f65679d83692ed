"""Committed notebooks are clean (no outputs, execution counts or volatile metadata) and have one `parameters`
cell; the git filter keeps them clean when a notebook is run and saved in JupyterLab. Notebooks check what they teach
with their own asserts (nbval compares no outputs: none are committed), so no output markers are left."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from actionft.notebooks import (KERNELSPEC, clean_notebook, clean_text, committed_text, dirty_notebooks,
                                list_notebooks, print_run_results)

ROOT = Path(__file__).parents[1]
NOTEBOOKS = list_notebooks()


def test_numbered_notebooks_exist():
    assert len(NOTEBOOKS) >= 6
    assert all(re.fullmatch(r"\d\d_[a-z0-9]+(?:_[a-z0-9]+)+\.ipynb", nb.name) for nb in NOTEBOOKS)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean(notebook):
    """What git would commit (the staged blob, after the nbstrip filter): a notebook run and saved in JupyterLab
    may hold outputs in the working file without failing this test, as long as they never reach the index."""
    text = committed_text(notebook)
    assert dirty_notebooks([notebook], [text]) == [], "fix: make setup, then git add the notebook again"
    nb = nbformat.reads(text, as_version=4)
    assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    assert clean_text(text) == text, "not in the committed format: run make clean-notebooks"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_exactly_one_parameters_cell(notebook):
    nb = nbformat.read(str(notebook), as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{notebook.name}: {len(tagged)} cells tagged 'parameters'"
    assert tagged[0].cell_type == "code" and tagged[0].source.strip()


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_sees_every_parameter(notebook):
    """papermill skips (with only a warning) a parameter line it cannot parse, e.g. one whose comment holds an '='.
    Such a parameter would silently keep its notebook default under `actionft run --set`."""
    from actionft.notebooks import notebook_parameters

    nb = nbformat.read(str(notebook), as_version=4)
    source = next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assigned = re.findall(r"^([A-Za-z_]\w*)\s*(?::[^=]+)?=", source, flags=re.M)
    assert assigned and sorted(notebook_parameters(notebook)) == sorted(assigned)


def test_dirty_notebook_is_detected_and_cleaned(tmp_path):
    """The check can fail: an executed copy with outputs and metadata is reported, and cleaning fixes it."""
    path = tmp_path / NOTEBOOKS[0].name
    shutil.copy(NOTEBOOKS[0], path)
    nb = nbformat.read(str(path), as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    code.execution_count = 3
    code.metadata["execution"] = {"iopub.status.busy": "2025-01-01T00:00:00Z"}
    nb.metadata["papermill"] = {"duration": 1.0}
    nbformat.write(nb, str(path))
    found = dirty_notebooks([path])
    assert any("outputs" in line for line in found) and any("papermill" in line for line in found)
    assert clean_notebook(path) is True
    assert dirty_notebooks([path]) == []
    assert clean_notebook(path) is False  # idempotent
    cleaned = nbformat.read(str(path), as_version=4)
    assert [c.source for c in cleaned.cells] == [c.source for c in nb.cells]


def lab_saved(text: str) -> str:
    """A notebook as JupyterLab saves it after running every cell: outputs, counts, timing and kernel metadata."""
    nb = nbformat.reads(text, as_version=4)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"cell {i}\n"),
                        nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=",
                                                                     "text/plain": "<Figure size 640x480>"})]
        cell.execution_count = i + 1
        cell.metadata["execution"] = {"iopub.status.idle": "2026-01-01T00:00:00Z"}
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.9", "mimetype": "text/x-python",
                                    "codemirror_mode": {"name": "ipython", "version": 3}}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    return nbformat.writes(nb) + "\n"


@pytest.mark.parametrize("notebook", NOTEBOOKS[:2], ids=lambda p: p.stem)
def test_clean_text_strips_a_lab_save_and_is_idempotent(notebook):
    committed = notebook.read_text()
    saved = lab_saved(committed)
    assert dirty_notebooks([notebook], [saved])  # the check sees the outputs and the kernelspec rewrite
    assert clean_text(saved) == committed  # byte for byte what is committed
    assert clean_text(clean_text(saved)) == clean_text(saved)


def test_filter_on_stdin_and_bad_input_passes_through():
    saved = lab_saved(NOTEBOOKS[0].read_text())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    run = lambda text: subprocess.run([sys.executable, "-m", "actionft.notebooks", "clean", "--stdin"],  # noqa: E731
                                      input=text, capture_output=True, text=True, env=env, check=True)
    assert run(saved).stdout == NOTEBOOKS[0].read_text()
    broken = run("<<<<<<< HEAD\n{not json")  # e.g. a merge conflict: never lose the user's text
    assert broken.stdout == "<<<<<<< HEAD\n{not json" and "passed through unchanged" in broken.stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_filter_keeps_lab_saves_out_of_commits(tmp_path):
    """`make setup`'s filter in a fresh repository: after a notebook is run and saved in the lab, `git status` is
    clean, `git add` stages the clean notebook, and the clean-notebook check reads what git would commit."""
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / ".gitattributes", repo / ".gitattributes")
    nb_path = repo / "notebooks" / NOTEBOOKS[0].name
    shutil.copy(NOTEBOOKS[0], nb_path)
    makefile = (ROOT / "Makefile").read_text()
    command = re.search(r"^NBSTRIP := (.+)$", makefile, flags=re.M).group(1)
    assert command.startswith(".venv/bin/python ")  # relative: git runs filters from the top of the work tree
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").symlink_to(sys.executable)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    git = lambda *args, cwd=repo: subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True,  # noqa: E731
                                                 text=True, check=True).stdout
    git("init", "-q")
    (repo / ".gitignore").write_text(".venv/\n")
    git("config", "filter.nbstrip.clean", command)
    git("config", "filter.nbstrip.smudge", "cat")
    git("add", ".gitattributes", ".gitignore", "notebooks")
    git("commit", "-q", "-m", "clean notebook")

    nb_path.write_text(lab_saved(NOTEBOOKS[0].read_text()))  # run all, Ctrl+S in the lab
    assert dirty_notebooks([nb_path]) != []  # the working file holds outputs ...
    # ... which git does not see: no diff (run from a subfolder: the filter's relative path still resolves), and
    # `git add` stages nothing. (`git status` lists the file until then: its size changed, and git checks sizes
    # before it runs the filter.)
    assert git("diff", "--stat", cwd=repo / "notebooks") == ""
    git("add", "-A", cwd=repo / "notebooks")
    assert git("status", "--porcelain") == "" and git("diff", "--cached", "--stat") == ""
    assert dirty_notebooks([nb_path], [committed_text(nb_path)]) == []

    # a real edit still reaches the index, without the outputs
    nb = nbformat.read(str(nb_path), as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("A new note."))
    nbformat.write(nb, str(nb_path))
    git("add", "notebooks")
    staged = committed_text(nb_path)
    assert "A new note." in staged and dirty_notebooks([nb_path], [staged]) == []
    assert nbformat.reads(staged, as_version=4).metadata["kernelspec"] == KERNELSPEC


def test_run_ends_with_the_headline_numbers_it_wrote(tmp_path, capsys):
    import json
    import time

    accuracy = {"base": 0.1222, "finetuned": 0.8222, "chance": 0.1111, "n": 90}
    (tmp_path / "accuracy.json").write_text(json.dumps(accuracy))
    (tmp_path / "metrics.json").write_text(json.dumps({"base": {"top1": 0.12, "bleu4": 0.05},
                                                       "finetuned": {"top1": 0.82, "bleu4": 0.61}, "n": 90}))
    print_run_results(tmp_path, since=0.0)
    out = capsys.readouterr().out
    assert "base 0.122, fine-tuned 0.822, chance 0.111" in out
    assert "| top1 | 0.120 | 0.820 |" in out and "| bleu4 | 0.050 | 0.610 |" in out
    print_run_results(tmp_path, since=time.time() + 60)  # files from an earlier run are not reported as this one's
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_dead_output_markers(notebook):
    """nbval compares a marked cell's fresh output with its stored one; committed notebooks store none, so a marker
    would check nothing while looking like a check."""
    nb = nbformat.read(str(notebook), as_version=4)
    assert not [c.id for c in nb.cells if "NBVAL_CHECK_OUTPUT" in c.source]


@pytest.mark.parametrize("notebook", [nb for nb in NOTEBOOKS if nb.name[:2] in ("01", "03", "05", "06")],
                         ids=lambda p: p.stem)
def test_notebook_asserts_what_it_teaches(notebook):
    nb = nbformat.read(str(notebook), as_version=4)
    asserts = [line for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines()
               if line.strip().startswith("assert ")]
    assert len(asserts) >= 2, f"{notebook.name}: {asserts}"


def test_executed_copy_keeps_the_final_state_of_text_bars(tmp_path):
    from actionft.notebooks import collapse_carriage_returns, tidy_executed_copy

    assert collapse_carriage_returns("\rtrain:  50%|#  | 1/2\rtrain: 100%|##| 2/2\n") == "train: 100%|##| 2/2\n"
    assert collapse_carriage_returns("\rvalidate: 100%|##| 2/2\r          \r\ndone\n") == "done\n"
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text=f"\rscore: {k}/3") for k in range(4)] + [
        nbformat.v4.new_output("stream", name="stderr", text="\n"),
        nbformat.v4.new_output("stream", name="stdout", text="accuracy 0.8\n"),
        nbformat.v4.new_output("stream", name="stderr", text="\rvalidate: 1/1\r      \r")]
    nb.cells = [cell]
    path = tmp_path / "run.ipynb"
    nbformat.write(nb, str(path))
    tidy_executed_copy(path)
    outs = nbformat.read(str(path), as_version=4).cells[0].outputs
    assert [(o.name, o.text) for o in outs] == [("stderr", "score: 3/3\n"), ("stdout", "accuracy 0.8\n")]
