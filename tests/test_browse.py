"""The sample browser of notebook 02: buttons, slider and class filter change the shown sample (no browser needed;
tests/test_browser.py drives the same widget in JupyterLab)."""

from __future__ import annotations

import pytest

pytest.importorskip("ipywidgets")

from actionft.browse import ALL, SampleBrowser  # noqa: E402


@pytest.fixture()
def browser(synth_samples):
    shown = []
    b = SampleBrowser(synth_samples, shown.append)
    return b, shown


def test_buttons_step_and_wrap(browser, synth_samples):
    b, shown = browser
    assert shown == [synth_samples[0]] and b.current() is synth_samples[0]
    b.next.click()
    assert b.current() is synth_samples[1] and shown[-1] is synth_samples[1]
    b.previous.click()
    b.previous.click()  # wraps to the last sample
    assert b.current() is synth_samples[-1] and shown[-1] is synth_samples[-1]
    assert b.where.value.startswith(f"{len(synth_samples)} of {len(synth_samples)}: ")


def test_slider_lands_on_a_chosen_sample(browser, synth_samples):
    b, shown = browser
    b.slider.value = 7
    assert b.current() is synth_samples[7] and shown[-1] is synth_samples[7]


def test_class_filter_narrows_the_pool(browser, synth_samples):
    b, shown = browser
    b.slider.value = 5
    n_shown = len(shown)
    b.classes.value = "shrink"
    shrink = [s for s in synth_samples if s.label == "shrink"]
    assert b.pool == shrink and b.slider.max == len(shrink) - 1
    assert len(shown) == n_shown + 1 and shown[-1] is shrink[0]  # one render for the new class
    b.next.click()
    assert b.current() is shrink[1] and b.current().label == "shrink"
    b.classes.value = ALL
    assert b.pool == list(synth_samples) and b.current() is synth_samples[0]
    assert set(b.classes.options) == {ALL} | {s.label for s in synth_samples}
