"""The language of what a student reads in figures and widgets: English (the default) or Korean.

The code of a notebook is the same in both editions; only this setting differs. It is read, in this order, from
`set_language` and from the environment variable ``LORA_LAB_LANG`` (the Korean notebooks' first cell sets it, so
the cells after it are byte for byte the English ones). `lora_lab.plots` and `lora_lab.widgets` pass every string
a student reads through `tr`: in English it is the string itself, so the English notebooks' outputs do not change;
in Korean it is the entry of `lora_lab.i18n_ko.KO`. Korean figures draw Hangul with NanumGothic, the font the
`koreanize-matplotlib` package ships (a core dependency); the package itself is not imported (its import changes
matplotlib's settings for every figure), only its font file is read.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

LANGUAGES = ("en", "ko")
ENV_VAR = "LORA_LAB_LANG"
KOREAN_FONT = "NanumGothic"
_chosen: str | None = None
_missing: set[str] = set()  # English strings asked for in Korean that have no entry (tests keep this empty)


def _check(language, source: str) -> str:
    if language not in LANGUAGES:
        raise ValueError(f"{source} must be one of {LANGUAGES}, got {language!r}; use 'ko' for the Korean edition.")
    return language


def set_language(language: str | None) -> None:
    """Choose the language of figures and widgets built from now on: "en", "ko", or None (back to
    ``LORA_LAB_LANG``, else English). Raises ValueError for any other value, before anything changes."""
    global _chosen
    _chosen = None if language is None else _check(language, "language")


def get_language() -> str:
    """The language in force: `set_language`'s, else ``LORA_LAB_LANG``'s, else "en"."""
    if _chosen is not None:
        return _chosen
    return _check(os.environ.get(ENV_VAR) or "en", f"the environment variable {ENV_VAR}")


def tr(text: str, /, **fields) -> str:
    """`text` in the language in force, then ``.format(**fields)``: ``tr("rank r = {r}", r=4)``.

    In English the template is `text` itself. In Korean it is ``KO[text]``; a string without an entry stays
    English and is remembered in `missing_translations` (the tests fail on any).
    """
    template = text
    if get_language() == "ko":
        from .i18n_ko import KO
        template = KO.get(text)
        if template is None:
            _missing.add(text)
            template = text
    return template.format(**fields) if fields else template


def tr_lines(text: str) -> str:
    """`tr` of each line of a multi-line label that has a letter in it ("1\nforward" -> "1\n순전파" in Korean);
    lines of numbers and symbols stay as they are."""
    return "\n".join(tr(line) if any(ch.isalpha() for ch in line) else line for line in str(text).split("\n"))


def missing_translations() -> set[str]:
    """The English strings `tr` was asked for in Korean and had no entry for (a copy)."""
    return set(_missing)


def korean_font_path() -> Path:
    """NanumGothic.ttf from the installed `koreanize-matplotlib`, found without importing that package."""
    spec = importlib.util.find_spec("koreanize_matplotlib")
    path = None if spec is None else Path(next(iter(spec.submodule_search_locations))) / "fonts" / "NanumGothic.ttf"
    if path is None or not path.is_file():
        raise RuntimeError("Korean figures need the font from koreanize-matplotlib: pip install koreanize-matplotlib "
                           "(./kit installs it).")
    return path


_default_family = None


def apply_font() -> None:
    """Make matplotlib draw the language in force: in Korean, DejaVu Sans first (Latin, Greek and math as in the
    English figures) with NanumGothic behind it for Hangul (matplotlib's per-glyph font fallback); in English, the
    family that was in force before Korean was asked for. `lora_lab.plots.new_figure` calls this."""
    import matplotlib
    from matplotlib import font_manager

    global _default_family
    if get_language() == "ko":
        path = str(korean_font_path())
        if not any(f.fname == path for f in font_manager.fontManager.ttflist):
            font_manager.fontManager.addfont(path)
        if _default_family is None:
            _default_family = list(matplotlib.rcParams["font.family"])
        matplotlib.rcParams["font.family"] = ["DejaVu Sans", KOREAN_FONT]
    elif _default_family is not None:
        matplotlib.rcParams["font.family"] = _default_family
        _default_family = None
