"""Tests for lora_lab.i18n: the language of figures and widgets, its Korean table, and the Korean font."""

import ast
import string
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import lora_lab as ll
from lora_lab import i18n
from lora_lab.i18n import ENV_VAR, get_language, set_language, tr
from lora_lab.i18n_ko import KO
from lora_lab.plots import memory as memory_plots
from lora_lab.plots import paper_table, quant, rank

PACKAGE = Path(ll.__file__).parent


def literal_keys():
    """Every string literal passed to `tr` in lora_lab (both arms of a conditional)."""
    keys = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "tr" and node.args:
                arg = node.args[0]
                arms = (arg.body, arg.orelse) if isinstance(arg, ast.IfExp) else (arg,)
                keys |= {a.value for a in arms if isinstance(a, ast.Constant)}
    return keys


def fields(template: str) -> list[str]:
    return sorted(f"{name}:{spec}" for _, name, spec, _ in string.Formatter().parse(template) if name is not None)


def test_english_is_the_default_and_leaves_every_string_as_it_is(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert get_language() == "en"
    assert tr("rank r") == "rank r"
    assert tr("top {top} singular values", top=8) == "top 8 singular values"


def test_korean_from_the_environment_variable_and_set_language_overrides_it(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "ko")
    assert tr("rank r") == "랭크 r"
    set_language("en")
    try:
        assert tr("rank r") == "rank r"
    finally:
        set_language(None)
    assert get_language() == "ko"


@pytest.mark.parametrize("bad", ["kr", "KO", "", 1])
def test_an_unknown_language_is_refused_before_anything_changes(bad):
    set_language("ko")
    try:
        with pytest.raises(ValueError, match="one of"):
            set_language(bad)
        assert get_language() == "ko"
    finally:
        set_language(None)


def test_an_unknown_language_in_the_environment_says_which_variable(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "jp")
    with pytest.raises(ValueError, match=ENV_VAR):
        get_language()


def test_every_string_the_package_translates_has_a_korean_entry():
    keys = literal_keys()
    assert len(keys) > 50  # the scan found the package's calls
    assert sorted(keys - set(KO)) == []


def test_every_korean_entry_prints_the_same_fields_with_the_same_digits():
    for english, korean in KO.items():
        assert fields(korean) == fields(english), english


def test_a_string_without_an_entry_stays_english_and_is_reported(korean):
    assert tr("no such string {n}", n=3) == "no such string 3"
    assert "no such string {n}" in i18n.missing_translations()
    i18n._missing.discard("no such string {n}")


def test_the_closing_tables_header_and_first_column_are_korean_and_the_values_as_given(korean):
    lines = paper_table([("NF4 levels: negative / zero / positive", "7 / 1 / 8 (bitsandbytes' code)", "7 / 1 / 8"),
                         ("", "x", 3)]).data.splitlines()
    assert lines[0] == "|  | 논문 | 여기서 측정 |"
    assert lines[2] == "| NF4 레벨: 음수 / 영 / 양수 | 7 / 1 / 8 (bitsandbytes' code) | 7 / 1 / 8 |"
    assert lines[3] == "|  | x | 3 |"  # an empty first cell stays empty


def test_the_korean_font_file_ships_with_koreanize_matplotlib():
    path = i18n.korean_font_path()
    assert path.name == "NanumGothic.ttf" and path.stat().st_size > 1_000_000


def korean_figures():
    rng = np.random.default_rng(0)
    curves = {"full fine-tuning": (np.arange(1, 11), np.linspace(1, 0.1, 10)),
              4: (np.arange(1, 11), np.linspace(1, 0.2, 10))}
    data = memory_plots.stacked_bar_data({"LoRA": {"frozen_weights": 2**20, "gradients": 2**19},
                                          "QLoRA": {"frozen_weights": 2**18, "activations": 2**19}})
    yield rank.plot_loss_curves(curves, highlight=4, reference="full fine-tuning", threshold=0.5,
                                ylabel="eval loss")[0]
    yield rank.plot_rank_summary([1, 2, 4], [10, 20, 40], [0.3, 0.2, 0.1], [0.5, 0.8, 0.9],
                                 full={"loss": 0.05, "accuracy": 1.0})[0]
    yield quant.plot_codebook(ll.nf4_codebook())[0]
    yield memory_plots.plot_dashboard(data)[0]
    yield memory_plots.plot_loss_curves({"LoRA": rng.random(20)})[0]


def draw_and_collect_glyph_warnings(fig) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.canvas.draw()
    return [str(w.message) for w in caught if "Glyph" in str(w.message) and "missing" in str(w.message)]


def test_korean_figures_draw_every_hangul_glyph(korean):
    for fig in korean_figures():
        text = " ".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))
        assert any("가" <= ch <= "힣" for ch in text)  # the figure says something in Korean
        assert draw_and_collect_glyph_warnings(fig) == []
    assert i18n.missing_translations() == set()


def test_without_the_korean_font_the_same_figure_warns_of_missing_glyphs(korean, monkeypatch):
    """The control for the test above: matplotlib's own fonts have no Hangul, and the check sees that."""
    from lora_lab.plots import _figure
    monkeypatch.setattr(_figure, "apply_font", lambda: None)
    import matplotlib
    monkeypatch.setitem(matplotlib.rcParams, "font.family", ["DejaVu Sans"])
    fig = rank.plot_live(10)[0]
    assert draw_and_collect_glyph_warnings(fig)


def test_english_figures_keep_matplotlibs_font_after_a_korean_one(korean):
    import matplotlib
    set_language("en")
    i18n.apply_font()
    before = list(matplotlib.rcParams["font.family"])
    set_language("ko")
    rank.plot_live(10)
    assert "NanumGothic" in matplotlib.rcParams["font.family"]
    set_language("en")
    rank.plot_live(10)
    assert list(matplotlib.rcParams["font.family"]) == before


def test_korean_widgets_label_their_controls_in_korean(korean):
    from lora_lab.widgets import lora as lora_widgets
    weight = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    box = lora_widgets.rank_explorer(weight, r=4)
    labels = [w.description for w in box.children if hasattr(w, "description") and w.description]
    assert "랭크 r" in labels
