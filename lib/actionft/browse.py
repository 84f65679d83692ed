"""Step through samples in JupyterLab: a slider, previous/next buttons and a class filter."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from actionft.data import Sample

ALL = "all classes"


class SampleBrowser:
    """The widget (`.widget`) and its controls; `show(sample)` draws one sample into the output area."""

    def __init__(self, samples: list[Sample], show: Callable[[Sample], None]):
        import ipywidgets as widgets

        if not samples:
            raise ValueError("no samples to browse")
        self.samples, self.show = samples, show
        labels = sorted({s.label for s in samples if s.label})
        self.classes = widgets.Dropdown(options=[ALL, *labels], value=ALL, description="class",
                                        layout=widgets.Layout(width="220px"))
        self.slider = widgets.IntSlider(value=0, min=0, max=len(samples) - 1, description="sample",
                                        continuous_update=False)
        self.previous = widgets.Button(description="previous", icon="arrow-left", layout=widgets.Layout(width="100px"))
        self.next = widgets.Button(description="next", icon="arrow-right", layout=widgets.Layout(width="100px"))
        self.where = widgets.Label()
        self.out = widgets.Output()
        self.pool = list(samples)
        self._refiltering = False
        self.slider.observe(lambda _: None if self._refiltering else self.render(), names="value")
        self.classes.observe(lambda _: self.refilter(), names="value")
        self.previous.on_click(lambda _: self.step(-1))
        self.next.on_click(lambda _: self.step(+1))
        self.widget = widgets.VBox([widgets.HBox([self.classes, self.previous, self.slider, self.next]), self.where,
                                    self.out])
        self.render()

    def current(self) -> Sample:
        return self.pool[self.slider.value]

    def step(self, delta: int) -> None:
        """Previous/next, wrapping around at the ends."""
        self.slider.value = (self.slider.value + delta) % len(self.pool)

    def refilter(self) -> None:
        chosen = self.classes.value
        self.pool = [s for s in self.samples if chosen == ALL or s.label == chosen]
        self._refiltering = True  # one render for the new pool, not one per slider change
        try:
            self.slider.value = 0
            self.slider.max = len(self.pool) - 1
        finally:
            self._refiltering = False
        self.render()

    def render(self) -> None:
        from IPython.display import clear_output

        s = self.current()
        self.where.value = f"{self.slider.value + 1} of {len(self.pool)}: [{s.split}] {s.clip_id}"
        with self.out:
            clear_output(wait=True)
            self.show(s)
