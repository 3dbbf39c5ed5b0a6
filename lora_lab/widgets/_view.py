"""A matplotlib figure shown inside an ipywidgets layout, redrawn in place."""

from __future__ import annotations

import io

import ipywidgets as widgets
import numpy as np
from PIL import Image


class FigureView:
    """Shows a figure as a PNG in an ``ipywidgets.Image``; ``refresh()`` re-renders it after artists change.

    A PNG in an Image widget works in every frontend (JupyterLab, Notebook, VS Code, a static render of the
    stored widget state) without an interactive matplotlib backend, and the figure is not duplicated by the
    inline backend because it is not managed by pyplot.

    Speed (a slider move must redraw well under 150 ms): the layout is computed once and then frozen, and
    when ``animated`` artists are given, everything else (axes, ticks, labels) is drawn once into a cached
    background; a refresh restores that background and draws only the animated artists (matplotlib's
    "blitting"), then encodes the PNG with light compression.

    Args:
        fig: The figure (from `lora_lab.plots`), with fixed axis limits if ``animated`` is given.
        animated: Artists that change on a redraw; ``()`` redraws the whole figure each time.
    """

    def __init__(self, fig, animated=()):
        self.fig = fig
        self.animated = list(animated)
        width = int(fig.get_figwidth() * fig.dpi)
        self.image = widgets.Image(format="png", layout=widgets.Layout(width=f"{width}px"))
        self.renders = 0
        for artist in self.animated:
            artist.set_animated(True)
        fig.canvas.draw()  # layout pass plus the static background
        fig.set_layout_engine("none")
        self._background = fig.canvas.copy_from_bbox(fig.bbox) if self.animated else None
        self.refresh()

    def refresh(self) -> None:
        """Render the figure to PNG and hand it to the Image widget."""
        canvas = self.fig.canvas
        if self._background is None:
            canvas.draw()
        else:
            canvas.restore_region(self._background)
            for artist in self.animated:
                self.fig.draw_artist(artist)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(canvas.buffer_rgba())).save(buf, format="png", compress_level=1)
        self.image.value = buf.getvalue()
        self.image.layout.visibility = "visible"
        self.renders += 1

    def hide(self) -> None:
        """Hide the figure until the next `refresh` (when what it shows no longer matches the controls)."""
        self.image.layout.visibility = "hidden"


E2E_CLASS = "lora-lab-e2e"  # the CSS class tests/browser/lab_driver.py looks for


def e2e_slider(slider):
    """Mark a slider for the browser test (the kit's one way: every builder and notebook calls this).

    The test moves it (by keyboard in JupyterLab, by mouse in Notebook 7) and expects the figure shown in the
    same cell to change, so mark only sliders that redraw a figure. Returns the slider.
    """
    slider.add_class(E2E_CLASS)
    return slider
