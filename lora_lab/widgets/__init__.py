"""Widget builders for the notebooks: each returns an ipywidgets box without displaying it.

One module per notebook topic. A builder takes data computed by a tested pure function, wires sliders to a
figure from `lora_lab.plots`, and returns the widget; the notebook displays it. Tests set widget values
programmatically and check that the data behind the figure changed. A slider that redraws a figure is marked
for the browser test with `e2e_slider`.
"""

from ._view import E2E_CLASS, FigureView, e2e_slider

__all__ = ["E2E_CLASS", "FigureView", "e2e_slider"]
