"""One build step pyproject.toml cannot say: put the notebooks inside the wheel, as ``lora_lab/notebooks/``.

``lora-lab lab`` (lora_lab/cli.py) copies them from there into a student's working folder. The repository
keeps them at the top level, where the course and the tests use them; an editable install reads them there.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithNotebooks(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        source = Path(__file__).parent / "notebooks"
        for notebook in sorted(source.rglob("*.ipynb")):
            if ".ipynb_checkpoints" not in notebook.parts:
                target = Path(self.build_lib) / "lora_lab" / "notebooks" / notebook.relative_to(source)
                self.mkpath(str(target.parent))
                self.copy_file(str(notebook), str(target))


setup(cmdclass={"build_py": BuildWithNotebooks})
