"""Training curves that redraw while a cell runs and leave one static figure behind."""

from __future__ import annotations

import io
import time
from typing import Any

from shaq.notebook.display import in_live_kernel, ipython

# Redraw at most this often, and spend at most a tenth of the time on drawing.
_MIN_REDRAW_S = 1.0


class LivePlot:
    """Curves of (x, y) points that a training loop adds to, one named series per curve.

    ::

        plot = LivePlot(ylabel="bits per byte")
        plot.hline(8.0, "uniform guess")
        for step in range(steps):
            ...
            plot.add("train", step, train_bpb)
        plot.close()

    In a Jupyter kernel that someone watches, the figure is shown once and then updated in
    place as points arrive; `close` draws the final state. Elsewhere (nbmake, plain Python)
    nothing is drawn until `close`, which shows the figure once (IPython) and returns it either
    way. The figure is a PNG image output, so the built book shows exactly the last state.
    """

    def __init__(
        self, xlabel: str = "step", ylabel: str = "bits per byte", title: str | None = None
    ):
        from matplotlib.figure import Figure  # not pyplot: no second copy appears at cell end

        self.figure = Figure(figsize=(6.0, 3.5), dpi=110, layout="constrained")
        self.axes = self.figure.add_subplot()
        self.axes.set(xlabel=xlabel, ylabel=ylabel)
        if title:
            self.axes.set_title(title)
        self.axes.grid(alpha=0.3)
        self.series: dict[str, tuple[list[float], list[float]]] = {}
        self._lines: dict[str, Any] = {}
        self._live = in_live_kernel()
        self._handle = None
        self._next_draw = 0.0
        self._closed = False

    def hline(self, y: float, label: str, **style) -> None:
        """A horizontal reference line (e.g. 8 bits per byte for the uniform guess)."""
        style = {"color": "gray", "linestyle": "--", "linewidth": 1, **style}
        self.axes.axhline(y, label=label, **style)

    def add(self, name: str, x: float, y: float) -> None:
        """Append the point (x, y) to the curve `name` and redraw if it is time to."""
        if self._closed:
            raise RuntimeError("this LivePlot is closed; make a new one")
        xs, ys = self.series.setdefault(name, ([], []))
        xs.append(float(x))
        ys.append(float(y))
        if self._live and time.perf_counter() >= self._next_draw:
            started = time.perf_counter()
            self._show()
            spent = time.perf_counter() - started
            self._next_draw = time.perf_counter() + max(_MIN_REDRAW_S, 10 * spent)

    def _redraw(self) -> None:
        for name, (xs, ys) in self.series.items():
            if name not in self._lines:
                (self._lines[name],) = self.axes.plot(xs, ys, label=name, markersize=3)
            self._lines[name].set_data(xs, ys)
            self._lines[name].set_marker("o" if len(xs) < 30 else "")  # dots only while sparse
        self.axes.relim()
        self.axes.autoscale_view()
        if self.series or self.axes.get_legend_handles_labels()[0]:
            self.axes.legend(loc="best")

    def png(self) -> bytes:
        """The current figure as PNG bytes."""
        self._redraw()
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png")
        return buffer.getvalue()

    def _show(self) -> None:
        if ipython() is None:
            return
        from IPython.display import Image, display

        image = Image(data=self.png(), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)

    def close(self):
        """Draw the final state (once) and return the matplotlib Figure."""
        if not self._closed:
            self._closed = True
            if ipython() is None:
                self._redraw()
            else:
                self._show()
        return self.figure
