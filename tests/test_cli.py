"""`lora-lab copy/lab/notebook`: the notebooks reach a student's folder, and a student's edits survive."""

import os

import pytest

from lora_lab import cli


def test_copy_brings_every_notebook_and_keeps_a_students_edits(tmp_path):
    source = cli.notebooks_source()
    shipped = sorted(p.relative_to(source) for p in source.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    copied, kept = cli.copy_notebooks(tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in copied) == shipped and kept == []
    assert all((tmp_path / name).read_bytes() == (source / name).read_bytes() for name in shipped)
    edited = tmp_path / shipped[0]
    edited.write_text("my answers")
    copied, kept = cli.copy_notebooks(tmp_path)
    assert kept == sorted(tmp_path / name for name in shipped) and copied == []
    assert edited.read_text() == "my answers"  # a second copy never overwrites work
    cli.copy_notebooks(tmp_path, force=True)
    assert edited.read_bytes() == (source / shipped[0]).read_bytes()


def test_lab_starts_jupyterlab_in_the_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execv", lambda exe, argv: calls.append(argv))
    cli.main(["lab", "--dir", str(tmp_path / "work"), "--port", "9999"])
    (argv,) = calls
    assert argv[1:4] == ["-m", "jupyterlab", str(tmp_path / "work")] and argv[-2:] == ["--port", "9999"]
    assert ("--allow-root" in argv) == (os.geteuid() == 0)  # root needs it, and says so on stderr
    assert any((tmp_path / "work").glob("*.ipynb"))


def test_copy_refuses_jupyter_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["copy", "--dir", str(tmp_path), "--port", "9999"])
    assert "copy takes no Jupyter arguments" in capsys.readouterr().err
