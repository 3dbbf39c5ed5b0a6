"""Colab and bare environments: each notebook's first code cell installs the kit where it is missing.

`scripts/colab.py` writes that cell and the README's "Open in Colab" links from the one repository URL in
pyproject.toml; these tests fail until it has been run after a change.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wheel_env import REPO, build_wheel, new_env, run

sys.path.insert(0, str(REPO / "scripts"))
import colab  # noqa: E402


def test_install_cells_and_readme_links_are_in_step():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "colab.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", colab.notebooks(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_the_first_code_cell_installs_the_kit_and_nothing_else_does(path):
    cells = [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    assert colab.TAG in cells[0]["metadata"].get("tags", [])
    assert "".join(cells[0]["source"]) == "".join(colab.install_cell(colab.repository(), colab.language_of(path)))
    assert cells[0]["outputs"] == []  # where the kit is installed, the cell does nothing
    assert not any("%pip" in "".join(c["source"]) for c in cells[1:])


def test_a_link_opens_each_notebook_from_its_editions_readme():
    repo = colab.repository().removeprefix("https://github.com/")
    readmes = {language: path.read_text(encoding="utf-8") for language, path in colab.READMES.items()}
    assert {colab.language_of(p) for p in colab.notebooks()} == set(readmes)  # README.ko.md exists for notebooks/ko
    for path in colab.notebooks():
        link = f"(https://colab.research.google.com/github/{repo}/blob/main/{path.relative_to(REPO).as_posix()})"
        for language, readme in readmes.items():
            assert (link in readme) == (language == colab.language_of(path)), (path.name, language)


def test_the_korean_install_cell_sets_the_language_and_installs_the_same_way():
    english, korean = colab.install_cell("https://github.com/o/r"), colab.install_cell("https://github.com/o/r", "ko")
    (setting,) = [line for line in korean if "LORA_LAB_LANG" in line]
    assert setting.startswith('os.environ["LORA_LAB_LANG"] = "ko"  # ')
    assert [line for line in korean if not line.startswith("#") and "LORA_LAB_LANG" not in line] == english[1:]


def test_a_notebook_installs_the_kit_into_a_bare_environment_and_runs(tmp_path):
    """No lora_lab in the environment: the notebook's own first cell installs the wheel, and the rest passes."""
    wheel = build_wheel(tmp_path)
    python = new_env(tmp_path / "bare", with_pip=True)
    course = tmp_path / "course"
    course.mkdir()
    notebook = REPO / "notebooks" / "01_lora_from_scratch.ipynb"
    (course / notebook.name).write_bytes(notebook.read_bytes())
    env = {**os.environ, "LORA_LAB_WHEEL": str(wheel), "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", "--nbval-current-env",
         "--nbval-sanitize-with", str(REPO / "notebooks" / "sanitize.cfg"), notebook.name], cwd=course, env=env)
    where = run([str(python), "-c", "import lora_lab; print(lora_lab.__file__)"], cwd=course).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "bare")  # installed by the notebook, into that environment
