"""The Korean edition: every English notebook has a twin in notebooks/ko/ whose code cells are the English ones.

`scripts/twins.py` builds each twin from the English notebook and its Korean prose (translations/ko/NN_name.md);
these tests fail until it has been run after a change, and until a changed twin has been executed (CONTRIBUTING.md,
"The Korean edition"). The one code cell a twin may differ in is the first, the Colab install cell that
`scripts/colab.py` writes: in Korean, and setting ``LORA_LAB_LANG=ko`` so the package labels its figures, widgets and
tables in Korean (`lora_lab.i18n`).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import colab  # noqa: E402
import twins  # noqa: E402

ENGLISH = twins.english_notebooks()


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def hangul(text: str) -> bool:
    return any("가" <= ch <= "힣" for ch in text)


@pytest.mark.parametrize("english", ENGLISH, ids=lambda p: p.name)
def test_every_english_notebook_has_a_twin(english):
    assert (twins.SOURCES / f"{english.stem}.md").is_file(), (
        f"{english.name} has no Korean prose: python scripts/twins.py --new {english.stem}, translate it, then "
        "python scripts/twins.py and execute the twin")
    assert (twins.TWINS / english.name).is_file(), f"run python scripts/twins.py to build ko/{english.name}"


def test_the_twins_are_in_step_with_the_english_notebooks_and_their_prose():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "twins.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("english", ENGLISH, ids=lambda p: p.name)
def test_code_cells_are_the_english_ones_byte_for_byte_except_the_install_cell(english):
    mine, theirs = code_cells(load(twins.TWINS / english.name)), code_cells(load(english))
    assert len(mine) == len(theirs)
    assert "".join(mine[0]["source"]) == "".join(colab.install_cell(colab.repository(), "ko"))
    assert 'os.environ["LORA_LAB_LANG"] = "ko"' in "".join(mine[0]["source"])
    for i, (a, b) in enumerate(zip(mine[1:], theirs[1:]), start=1):
        assert a["source"] == b["source"], f"code cell {i} differs from {english.name}'s: run python scripts/twins.py"
        assert a["metadata"].get("tags", []) == b["metadata"].get("tags", [])


@pytest.mark.parametrize("english", ENGLISH, ids=lambda p: p.name)
def test_the_markdown_is_korean_and_in_the_english_cells_places(english):
    mine, theirs = load(twins.TWINS / english.name)["cells"], load(english)["cells"]
    assert [c["cell_type"] for c in mine] == [c["cell_type"] for c in theirs]
    for i, cell in enumerate(mine):
        if cell["cell_type"] == "markdown":
            assert hangul("".join(cell["source"])), f"ko/{english.name} Markdown cell {i} has no Korean"
    title = "".join(mine[0]["source"]).splitlines()[0]
    assert title.startswith(f"# {english.name[:2]} — ") and hangul(title)


@pytest.mark.parametrize("english", ENGLISH, ids=lambda p: p.name)
def test_the_twins_outputs_come_from_its_own_korean_run(english):
    """Executed (every cell the English run gives an output has one), and in Korean: the package's strings in the
    stored outputs (tables, widget labels) are Korean, so they were not copied from the English notebook."""
    mine, theirs = code_cells(load(twins.TWINS / english.name)), code_cells(load(english))
    unexecuted = [i for i, (a, b) in enumerate(zip(mine, theirs)) if b["outputs"] and not a["outputs"]]
    assert not unexecuted, f"ko/{english.name}: code cells {unexecuted} have no outputs; execute and clean it"
    nb = load(twins.TWINS / english.name)
    stored = json.dumps([c["outputs"] for c in mine], ensure_ascii=False)
    stored += json.dumps(nb["metadata"].get("widgets", {}), ensure_ascii=False)
    assert hangul(stored), f"ko/{english.name}'s outputs have no Korean: execute it (its first cell sets the language)"
    english_text = json.dumps([c["outputs"] for c in theirs], ensure_ascii=False)
    for header in ("|  | paper | measured here |", "<th>quantizer</th>"):
        if header in english_text:
            assert header not in stored, f"ko/{english.name} stores an English {header!r}: execute it again"


NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")


def compared_numbers(cell: dict) -> list[str]:
    """The numbers in the outputs nbval compares (text, stream, Markdown), in order; none for an ignored cell."""
    if "NBVAL_IGNORE_OUTPUT" in "".join(cell["source"]) or "nbval-ignore-output" in cell["metadata"].get("tags", []):
        return []
    text = []
    for out in cell["outputs"]:
        text.append("".join(out.get("text", "")) if out.get("name") != "stderr" else "")
        text += ["".join(out.get("data", {}).get(k, "")) for k in ("text/plain", "text/markdown")]
    return NUMBER.findall("\n".join(text))


@pytest.mark.parametrize("english", ENGLISH, ids=lambda p: p.name)
def test_the_twin_prints_the_english_notebooks_numbers(english):
    """Same code, same numbers: only the words of the package's labels differ between the editions' outputs. This
    is what lets the twins' stored outputs rely on the English notebooks' portability checks."""
    mine, theirs = code_cells(load(twins.TWINS / english.name)), code_cells(load(english))
    for i, (a, b) in enumerate(zip(mine, theirs)):
        assert compared_numbers(a) == compared_numbers(b), f"ko/{english.name} code cell {i} prints other numbers"


def table_first_cells(cell: dict) -> list[str]:
    """The first cell of each body row of the Markdown tables a code cell displays (the closing table's claims)."""
    cells = []
    for out in cell["outputs"]:
        text = "".join(out.get("data", {}).get("text/markdown", ""))
        if text.startswith("|"):
            cells += [line.strip("|").split(" | ")[0].strip() for line in text.splitlines()[2:]]
    return cells


@pytest.mark.parametrize("english", ENGLISH, ids=lambda p: p.name)
def test_the_twins_closing_tables_name_each_claim_in_korean(english):
    from lora_lab.i18n_ko import KO

    mine, theirs = code_cells(load(twins.TWINS / english.name)), code_cells(load(english))
    pairs = [(en, ko) for a, b in zip(mine, theirs) for en, ko in zip(table_first_cells(b), table_first_cells(a))]
    assert pairs or not any(table_first_cells(b) for b in theirs)
    untranslated = [en for en, ko in pairs if en and (en not in KO or ko != KO[en])]
    assert not untranslated, f"add these to lora_lab/i18n_ko.py, then execute ko/{english.name}: {untranslated}"
