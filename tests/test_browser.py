"""Notebooks as a person uses them: JupyterLab started the way `make lab` starts it, driven in headless Chromium.

Notebooks 01-03 and 05 (with the embedded run's adapter) are run from the Run menu; each must finish without an error output and with its figures; 02's
sample browser must render as a widget whose buttons, slider and class filter change the shown sample; a notebook
saved in the lab (outputs, JupyterLab's own metadata) must clean to exactly its committed text. Screenshots go to
outputs/browser/. Needs Debian's Chromium (`apt-get install -y chromium`) and the `playwright` package of the dev
extras; no browser is downloaded. Heavy (minutes): run it alone, e.g. `pytest tests/test_browser.py -m browser`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from actionft.notebooks import clean_text, dirty_notebooks
from actionft.quiet import HEADLESS_ENV

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).parents[1]
SHOTS = ROOT / "outputs" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NOTEBOOK_TIMEOUT_S = 900  # one notebook, run from the menu on a busy 2-core machine


def lab_arguments() -> list[str]:
    """The arguments `make lab` passes to `jupyter lab` (read from the Makefile, so the two cannot drift)."""
    match = re.search(r"^LAB_ARGS := (.+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert match, "Makefile: LAB_ARGS is gone"
    return shlex.split(match.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1, rooted like `make lab`, with its settings in a temporary folder."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: apt-get install -y chromium")
    pytest.importorskip("playwright", reason="the playwright package is missing: pip install -e '.[dev]'")
    home = tmp_path_factory.mktemp("lab")
    # no autosave: the test saves once, on purpose, and then puts the committed notebook back
    settings = home / "settings" / "@jupyterlab" / "docmanager-extension"
    settings.mkdir(parents=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    news = home / "settings" / "@jupyterlab" / "apputils-extension"  # no "receive news?" toast over the menus
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    port, token = free_port(), "actionft-browser-test"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "JUPYTER_CONFIG_DIR": str(home),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "HF_HUB_OFFLINE": "1"}
    env.pop(HEADLESS_ENV, None)  # a browser renders the widgets here
    cmd = [sys.executable, "-m", "jupyterlab", *lab_arguments(), "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
           f"--LabApp.user_settings_dir={home / 'settings'}", f"--LabApp.workspaces_dir={home / 'workspaces'}"]
    if os.geteuid() == 0:  # CI runs as root; JupyterLab refuses that unless told
        cmd.append("--allow-root")
    log = (home / "lab.log").open("w")
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"JupyterLab did not start: {(home / 'lab.log').read_text()[-2000:]}")
            time.sleep(1)
    try:
        yield {"url": url, "token": token}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.goto(f"{lab['url']}/?token={lab['token']}")  # the default URL of `make lab`
        pg.wait_for_selector(".jp-DirListing-content", timeout=120_000)
        yield pg
        browser.close()


def test_lab_opens_the_repo_root_on_notebooks(page):
    """Like `make lab`: the file browser starts in notebooks/, and the repository root (outputs/, params/, the
    README) is one click up."""
    listing = page.locator(".jp-DirListing-content")
    listing.get_by_text("01_explore_dataset.ipynb").wait_for()
    assert "/lab/tree/notebooks" in page.url or "notebooks" in page.locator(".jp-BreadCrumbs").inner_text()
    page.locator(".jp-BreadCrumbs-home").click()
    for name in ("notebooks", "outputs", "params", "README.md"):
        listing.get_by_text(name, exact=True).first.wait_for()
    page.screenshot(path=str(SHOTS / "lab_root.png"))


def prompts(page) -> list[str]:
    return [t.strip() for t in page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()]


def open_and_run(page, lab, name: str) -> None:
    """Open notebooks/<name> in the lab, Run > Run All Cells, and wait until the kernel has worked through the
    queue (every cell run, or the rest cancelled after an error)."""
    page.goto(f"{lab['url']}/lab/tree/notebooks/{name}?reset")
    deadline = time.time() + 180
    while True:  # until the notebook is shown and its kernel is up
        chooser = page.locator(".jp-Dialog", has_text="Select Kernel")
        if chooser.count():  # JupyterLab may ask; the project's Python 3 kernel is preselected
            chooser.locator("button.jp-mod-accept").click()
        ready = page.locator(".jp-Notebook .jp-CodeCell").count() and page.locator(
            ".jp-Notebook-ExecutionIndicator[data-status='idle']").count()
        if ready:
            break
        if time.time() > deadline:
            page.screenshot(path=str(SHOTS / name.replace(".ipynb", ".open.png")))
            pytest.fail(f"{name}: the notebook or its kernel did not come up")
        time.sleep(1)
    page.locator(".jp-Notebook .jp-CodeCell .jp-InputArea-prompt").first.click()  # the notebook is the active tab
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item:not(.lm-mod-disabled) .lm-Menu-itemLabel",
                 has_text=re.compile(r"^Run All Cells$")).click()
    deadline = time.time() + NOTEBOOK_TIMEOUT_S
    started, clicked = False, time.time()
    while time.time() < deadline:
        shown = prompts(page)
        started = started or any(p not in ("[ ]:", "") for p in shown)
        if not started and time.time() - clicked > 120:
            page.screenshot(path=str(SHOTS / name.replace(".ipynb", ".not_started.png")), full_page=True)
            pytest.fail(f"{name}: Run All Cells did not start the cells: {shown[:5]}")
        idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count() > 0
        if started and idle and "[*]:" not in shown:
            return
        time.sleep(2)
    page.screenshot(path=str(SHOTS / name.replace(".ipynb", ".timeout.png")), full_page=True)
    pytest.fail(f"{name}: still running after {NOTEBOOK_TIMEOUT_S} s: {prompts(page)}")


def save_and_read(page, path: Path) -> nbformat.NotebookNode:
    """Ctrl+S in the lab, then the notebook as JupyterLab wrote it."""
    before = path.stat().st_mtime_ns
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^File$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Save( Notebook)?$")).first.click()
    deadline = time.time() + 60
    while path.stat().st_mtime_ns == before and time.time() < deadline:
        time.sleep(0.5)
    assert path.stat().st_mtime_ns != before, f"{path.name} was not saved"
    return nbformat.read(str(path), as_version=4)


@pytest.fixture(scope="module")
def tiny_adapter() -> Path:
    """Notebook 05 answers with the embedded run's adapter: the one notebook 04 wrote (`make test` runs the notebooks
    before the tests), else the same run trained here (a few minutes)."""
    adapter = ROOT / "outputs" / "tiny" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "actionft.cli", "train", "--params", "params/tiny.yaml"], cwd=ROOT,
                       env=env, check=True, stdout=subprocess.DEVNULL)
    return adapter


@pytest.mark.parametrize(("name", "min_images"), [
    ("01_explore_dataset.ipynb", 2),
    ("02_visualize_frames.ipynb", 4),
    ("03_check_collator.ipynb", 0),
    ("05_run_inference.ipynb", 1),
])
def test_run_all_in_jupyterlab(lab, page, name, min_images, request):
    if name.startswith("05"):
        request.getfixturevalue("tiny_adapter")
    path = ROOT / "notebooks" / name
    committed = path.read_text()
    try:
        open_and_run(page, lab, name)
        page.screenshot(path=str(SHOTS / name.replace(".ipynb", ".png")), full_page=True)
        saved = save_and_read(page, path)
        if name.startswith("02"):
            check_sample_browser(page)
    finally:
        # what the test saved must not stay in the working copy (the git filter would keep it out of commits anyway)
        path.write_text(committed)
    code = [c for c in saved.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]
    assert all(c.execution_count for c in code), "some cells did not run"
    images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert images >= min_images, f"{name}: {images} figures rendered"
    stderr = "".join(o.text for c in code for o in c.outputs if o.output_type == "stream" and o.name == "stderr")
    for noise in ("cannot find -laio", "No CUDA runtime", "gemm_4bit_forward", "is_gradient_checkpointing"):
        assert noise not in stderr, stderr
    # what JupyterLab saved (outputs, its kernelspec and language_info) cleans to exactly the committed text
    lab_text = nbformat.writes(saved) + "\n"
    assert dirty_notebooks([path], [lab_text]) and clean_text(lab_text) == committed


def shown_sample(page) -> str:
    return page.locator(".jupyter-widgets.widget-label", has_text=" of ").first.inner_text()


def wait_for_change(page, before: str) -> str:
    deadline = time.time() + 60
    while time.time() < deadline:
        now = shown_sample(page)
        if now != before:
            return now
        time.sleep(0.3)
    raise AssertionError(f"the shown sample stayed {before!r}")


def check_sample_browser(page) -> None:
    """02's browser is a real widget: next/previous, the slider and the class filter change the shown sample."""
    widget = page.locator(".jupyter-widgets.widget-vbox", has=page.locator(".widget-slider")).last
    widget.scroll_into_view_if_needed()
    first = shown_sample(page)
    assert first.startswith("1 of "), first
    widget.locator("button.widget-button", has_text="next").click()
    second = wait_for_change(page, first)
    assert second.startswith("2 of "), second
    widget.locator("button.widget-button", has_text="previous").click()
    assert wait_for_change(page, second) == first
    handle = widget.locator(".noUi-handle").first
    handle.focus()
    for _ in range(5):
        handle.press("ArrowRight")
    moved = wait_for_change(page, first)
    deadline, last_change = time.time() + 60, time.time()  # the key presses arrive one by one: wait until settled
    while time.time() - last_change < 3 and time.time() < deadline:
        time.sleep(0.3)
        now = shown_sample(page)
        if now != moved:
            moved, last_change = now, time.time()
    assert not moved.startswith("1 of "), moved
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
    figure = widget.locator(".widget-output img").last
    before_filter = figure.get_attribute("src")
    widget.locator("select").first.select_option("shrink")
    shrink = wait_for_change(page, moved)
    assert re.match(r"1 of \d+: \[\w+\] shrink", shrink), shrink
    deadline = time.time() + 120  # the label changes at once; the new figure comes from the kernel
    while figure.get_attribute("src") == before_filter and time.time() < deadline:
        time.sleep(0.5)
    assert figure.is_visible() and figure.get_attribute("src") != before_filter, "the figure did not change"
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
    page.screenshot(path=str(SHOTS / "02_sample_browser.png"), full_page=False)
    summary = {"first": first, "after_next": second, "after_slider": moved, "after_filter": shrink}
    (SHOTS / "02_sample_browser.json").write_text(json.dumps(summary, indent=1))
