"""Tests for lora_lab.widgets.merge: the training-length slider shows more of ΔW surviving as it grows."""

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from lora_lab.widgets import E2E_CLASS
from lora_lab.widgets.merge import erasure_table, requant_explorer

CODEBOOK = torch.linspace(-1, 1, 15)


class Quantized:
    def __init__(self, w):
        self.shape = w.shape
        flat = w.flatten().view(-1, 64)
        self.absmax = flat.abs().amax(1, keepdim=True)
        self.codes = ((flat / self.absmax).unsqueeze(-1) - CODEBOOK).abs().argmin(-1)

    def dequantize(self):
        return (CODEBOOK[self.codes] * self.absmax).view(self.shape)


@pytest.fixture
def table():
    g = torch.Generator().manual_seed(0)
    w, direction = torch.randn(8, 64, generator=g) * 0.05, torch.randn(8, 64, generator=g)
    # the update grows with training length, as a fine-tune's ΔW does
    return erasure_table({s: (w, direction * 1e-4 * s) for s in (1, 10, 100)}, Quantized, CODEBOOK)


def test_slider_moves_histogram_and_readout(table):
    box = requant_explorer(table)
    erased_early, png = box.current["summary"].erased, box.image.value
    box.slider.value = 100
    assert box.current["summary"].erased < erased_early
    assert [r.get_height() for r in box.bars] == pytest.approx(list(table[100]["hist"]))
    assert box.image.value != png and box.readout.value.startswith("step 100:")


def test_step_slider_is_marked_for_the_browser_test(table):
    assert E2E_CLASS in requant_explorer(table).slider._dom_classes


def test_histogram_mass_moves_right_with_training(table):
    centers_mean = {s: float((t["hist"] * range(len(t["hist"]))).sum()) for s, t in table.items()}
    assert centers_mean[1] < centers_mean[10] < centers_mean[100]


def test_empty_table_raises():
    with pytest.raises(ValueError):
        requant_explorer({})
