"""A class on a real JupyterHub, on 127.0.0.1: the hub, its proxy, one server and kernel per student.

`Hub` starts the `jupyterhub` package with `configurable-http-proxy` (from npm, installed by
``scripts/ensure_hub_proxy.sh``), the `DummyAuthenticator` (the students are its `allowed_users`, any password)
and the `SimpleLocalProcessSpawner` (each student's server runs as this user, with its own home folder in the
hub's temporary directory). Everything listens on 127.0.0.1 only, in a temporary directory removed afterwards,
and `Hub.stop` ends every process the hub started (servers, kernels, proxy), then checks that none is left.

`Student` does what a student's browser does, over HTTP to the proxy's public port, never to a server directly:

1. logs in through the hub's REST API (``POST /hub/api/users/NAME/tokens`` with a username and password in the
   body: the authenticator checks them) and gets the student's own API token;
2. starts the student's server (``POST /hub/api/users/NAME/server``) and waits until the hub says it is ready;
3. uploads a notebook into the server (``PUT /user/NAME/api/contents/...``), opens a session on it (a kernel whose
   working directory is the notebook's folder) and runs its code cells one by one over the kernel's websocket
   (``/user/NAME/api/kernels/ID/channels``, Jupyter's messaging protocol), as Run All does: it stops at the first
   cell that raises.

`MemorySampler` reads, every `interval_s`, the process tree of each student's server (the server and its
kernels, found by the ``JUPYTERHUB_USER`` variable the spawner sets) with psutil: RSS (resident pages, shared
libraries counted in full: what a per-user memory limit in its own container sees) and PSS (shared pages divided
among the processes that map them: the students' PSS add up to what they take together on one machine).

Used by ``benchmarks/bench_hub.py`` (a class of N) and ``tests/test_hub.py`` (two students, a tiny notebook).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable
from urllib.parse import quote

import psutil
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

ROOT = Path(__file__).resolve().parents[1]
PROXY_SCRIPT = ROOT / "scripts" / "ensure_hub_proxy.sh"
MAX_STUDENTS = 32  # a bound on what one run may start: 32 servers and their kernels
LOOPBACK = "127.0.0.1"


class HubError(RuntimeError):
    """The hub, a server or a kernel did not do what a student's browser needs."""


def ensure_proxy() -> Path:
    """Install configurable-http-proxy into .venv/hub/ (once) and return its command's path.

    Raises:
        HubError: with the script's message (how to install node and npm, or npm's error).
    """
    proc = subprocess.run(["bash", str(PROXY_SCRIPT)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    path = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not Path(path).is_file():
        raise HubError(f"scripts/ensure_hub_proxy.sh failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    return Path(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _hub_config(*, port: int, hub_port: int, api_port: int, proxy: Path, students: list[str], tmp: Path,
                spawn_timeout_s: int) -> str:
    root_args = ["--allow-root"] if os.geteuid() == 0 else []  # the single-user servers refuse root otherwise
    lines = {
        "JupyterHub.bind_url": f"http://{LOOPBACK}:{port}",
        "JupyterHub.hub_bind_url": f"http://{LOOPBACK}:{hub_port}",
        "JupyterHub.authenticator_class": "dummy",
        "JupyterHub.spawner_class": "simple",
        "JupyterHub.db_url": f"sqlite:///{tmp / 'jupyterhub.sqlite'}",
        "JupyterHub.cookie_secret_file": str(tmp / "jupyterhub_cookie_secret"),
        "JupyterHub.pid_file": str(tmp / "jupyterhub.pid"),
        "JupyterHub.cleanup_servers": True,
        "JupyterHub.cleanup_proxy": True,
        "ConfigurableHTTPProxy.command": [str(proxy)],
        "ConfigurableHTTPProxy.api_url": f"http://{LOOPBACK}:{api_port}",
        "ConfigurableHTTPProxy.pid_file": str(tmp / "proxy.pid"),
        "Authenticator.allowed_users": set(students),
        "SimpleLocalProcessSpawner.home_dir_template": str(tmp / "home" / "{username}"),
        "Spawner.cmd": [sys.executable, "-m", "jupyterhub.singleuser"],
        "Spawner.args": root_args,
        "Spawner.ip": LOOPBACK,
        # the kernels import this checkout's lora_lab, not whichever one the environment has installed
        "Spawner.environment": {"PYTHONPATH": str(ROOT)},
        "Spawner.start_timeout": spawn_timeout_s,
        "Spawner.http_timeout": spawn_timeout_s,
    }
    return "\n".join(f"c.{key} = {value!r}" for key, value in lines.items()) + "\n"


class Hub:
    """A JupyterHub on 127.0.0.1 for `students`; a context manager that always stops what it started.

    Args:
        students: the usernames the hub lets in (at most `MAX_STUDENTS`).
        proxy: configurable-http-proxy's command (`ensure_proxy()`).
        spawn_timeout_s: how long the hub waits for one server to start (loaded machines are slow).
    """

    def __init__(self, students: list[str], proxy: Path, spawn_timeout_s: int = 180):
        if not 1 <= len(students) <= MAX_STUDENTS:
            raise ValueError(f"a hub run takes 1 to {MAX_STUDENTS} students, not {len(students)}")
        self.students, self.proxy, self.spawn_timeout_s = list(students), proxy, spawn_timeout_s
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, psutil.Process] = {}  # every process of the hub's tree seen while it ran
        self.cmdlines: dict[int, str] = {}  # and its command line
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def log(self) -> str:
        path = Path(self._tmp.name) / "jupyterhub.log" if self._tmp else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def start(self, timeout_s: float = 60) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="lora-lab-hub-")
        tmp = Path(self._tmp.name)
        config = _hub_config(port=self.port, hub_port=free_port(), api_port=free_port(), proxy=self.proxy,
                             students=self.students, tmp=tmp, spawn_timeout_s=self.spawn_timeout_s)
        (tmp / "jupyterhub_config.py").write_text(config)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}  # loopback: no HTTP proxy
        with open(tmp / "jupyterhub.log", "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(tmp / "jupyterhub_config.py")],
                                         cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            self._wait_until_up(timeout_s)
        except BaseException:
            self.stop()  # nothing of a hub that did not come up is left running
            raise

    def _wait_until_up(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HubError(f"jupyterhub exited with {self.proc.returncode}:\n{self.log[-3000:]}")
            try:  # through the proxy: the hub is up and the proxy routes to it
                with socket.create_connection((LOOPBACK, self.port), timeout=1):
                    pass
                if _get_json_sync(f"{self.url}/hub/api/").get("version"):
                    self.track()
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise HubError(f"jupyterhub did not answer on {self.url} within {timeout_s:.0f} s:\n{self.log[-3000:]}")

    def track(self) -> list[psutil.Process]:
        """The hub's process tree now (proxy, servers, kernels); remembered, so `stop` can check them all."""
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            return []
        for p in procs:
            if p.pid not in self.seen:
                try:
                    self.cmdlines[p.pid] = " ".join(p.cmdline())
                except psutil.Error:
                    continue
                self.seen[p.pid] = p
        return procs

    def stop(self, timeout_s: float = 30) -> list[str]:
        """Stop the hub (it stops the servers and the proxy), then anything of its tree still running.

        Returns:
            The processes that had to be killed after the hub's own shutdown (empty when it cleaned up itself).
        """
        if self.proc is None:
            return []
        self.track()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _, alive = psutil.wait_procs([p for p in self.seen.values() if p.is_running()], timeout=5)
        leftover = [f"{p.pid} {self.cmdlines.get(p.pid, '')[:80]}" for p in alive if _alive(p)]
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        self.proc = None
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None
        return leftover

    def __enter__(self) -> Hub:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _get_json_sync(url: str) -> dict:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as r:
        return json.loads(r.read())


@dataclass
class NotebookRun:
    """One notebook run by one student: wall time, cells run, and the first error (None when all ran)."""

    path: str
    seconds: float = 0.0
    cells_run: int = 0
    cells: int = 0
    kernel_id: str = ""
    error: str | None = None
    outputs: list[str] = field(default_factory=list)  # each cell's text output (stream + text/plain results)


@dataclass
class Student:
    """One simulated student: logs in, starts a server, runs notebooks over the kernel websocket."""

    hub_url: str
    name: str
    cell_timeout_s: float = 600
    token: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    runs: list[NotebookRun] = field(default_factory=list)

    def __post_init__(self):
        self.http = AsyncHTTPClient(force_instance=True, max_clients=16)
        self.session_id = uuid.uuid4().hex

    async def api(self, method: str, path: str, body=None, timeout: float = 60, auth: bool = True):
        headers = {"Content-Type": "application/json"}
        if auth and self.token:
            headers["Authorization"] = f"token {self.token}"
        req = HTTPRequest(self.hub_url + path, method=method, headers=headers, request_timeout=timeout,
                          body=None if body is None and method in ("GET", "DELETE") else json.dumps(body or {}),
                          allow_nonstandard_methods=True)
        resp = await self.http.fetch(req)
        return json.loads(resp.body) if resp.body else None

    async def login(self, password: str = "any") -> None:
        """The REST login: the authenticator checks the username and password, the hub returns a token."""
        t0 = time.monotonic()
        reply = await self.api("POST", f"/hub/api/users/{self.name}/tokens", auth=False,
                               body={"auth": {"username": self.name, "password": password}, "note": "class run"})
        self.token = reply["token"]
        self.timings["login_s"] = time.monotonic() - t0

    async def start_server(self, timeout_s: float = 300) -> None:
        t0 = time.monotonic()
        await self.api("POST", f"/hub/api/users/{self.name}/server")
        while time.monotonic() - t0 < timeout_s:
            server = (await self.api("GET", f"/hub/api/users/{self.name}"))["servers"].get("", {})
            if server.get("ready"):
                await self.api("GET", f"/user/{self.name}/api/status")  # through the proxy's route
                self.timings["spawn_s"] = time.monotonic() - t0
                return
            await asyncio.sleep(0.5)
        raise HubError(f"{self.name}'s server was not ready after {timeout_s:.0f} s")

    async def stop_server(self) -> None:
        await self.api("DELETE", f"/hub/api/users/{self.name}/server", timeout=120)

    async def run_notebook(self, notebook: Path) -> NotebookRun:
        """Upload `notebook` into the student's home, open it in a new kernel and run its code cells in order."""
        run = NotebookRun(notebook.name)
        self.runs.append(run)
        contents = f"/user/{self.name}/api/contents/{quote(notebook.name)}"
        await self.api("PUT", contents, {"type": "notebook", "format": "json",
                                         "content": json.loads(notebook.read_text(encoding="utf-8"))})
        nb = (await self.api("GET", contents))["content"]  # what the server read back from the home folder
        cells = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                 for c in nb["cells"] if c["cell_type"] == "code"]
        run.cells = len(cells)
        session = await self.api("POST", f"/user/{self.name}/api/sessions",
                                 {"path": notebook.name, "type": "notebook", "name": notebook.name,
                                  "kernel": {"name": "python3"}})
        run.kernel_id = session["kernel"]["id"]
        ws_url = (self.hub_url.replace("http", "ws", 1) + f"/user/{self.name}/api/kernels/"
                  f"{session['kernel']['id']}/channels?session_id={self.session_id}")
        ws = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {self.token}"}))
        t0 = time.monotonic()
        try:
            await self._execute(ws, "kernel_info_request", {})
            for code in cells:
                reply, text = await self._execute(ws, "execute_request", {
                    "code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True})
                run.outputs.append(text)
                run.cells_run += 1
                if reply.get("status") != "ok":
                    run.error = f"cell {run.cells_run}: {reply.get('ename')}: {reply.get('evalue')}"
                    break
        finally:
            run.seconds = time.monotonic() - t0
            ws.close()
        return run

    async def _execute(self, ws, msg_type: str, content: dict) -> tuple[dict, str]:
        """Send one shell request; collect its iopub text until the kernel is idle and the reply has come."""
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": msg_type, "username": self.name, "session": self.session_id,
                  "date": "", "version": "5.3"}
        await ws.write_message(json.dumps({"header": header, "parent_header": {}, "metadata": {},
                                           "content": content, "channel": "shell", "buffers": []}))
        reply, idle, text = None, False, []
        while reply is None or not idle:
            raw = await asyncio.wait_for(ws.read_message(), self.cell_timeout_s)
            if raw is None:
                raise HubError(f"{self.name}: the kernel's websocket closed during {msg_type}")
            if isinstance(raw, bytes):  # binary messages carry widget buffers: not part of the text output
                continue
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, body = msg["header"]["msg_type"], msg["content"]
            if msg["channel"] == "shell" and kind.endswith("_reply"):
                reply = body
            elif kind == "status" and body.get("execution_state") == "idle":
                idle = True
            elif kind == "stream":
                text.append(body["text"])
            elif kind in ("execute_result", "display_data") and "text/plain" in body.get("data", {}):
                text.append(body["data"]["text/plain"] + "\n")
            elif kind == "error":
                text.append(f"{body['ename']}: {body['evalue']}\n")
        return reply, "".join(text)


@dataclass
class TreeMemory:
    """Peaks over a run for one student's server tree, in bytes; CPU seconds used by the tree's processes."""

    rss_peak: int = 0
    pss_peak: int = 0
    processes_peak: int = 0
    kernels_peak: int = 0
    cpu_s: float = 0.0


class MemorySampler:
    """Samples each student's server tree (server + kernels) and the hub + proxy, every `interval_s`."""

    def __init__(self, hub: Hub, interval_s: float = 1.0):
        self.hub, self.interval_s = hub, interval_s
        self.students: dict[str, TreeMemory] = {}
        self.hub_rss_peak = 0
        self.total_pss_peak = 0  # all students' trees together, at the same instant
        self._cpu: dict[int, tuple[str, float]] = {}  # pid -> (student, last cpu seconds seen)
        self.processes: dict[int, dict] = {}  # pid -> {"cmdline", "rss_peak", "cpu_s"}, each student process
        self._users: dict[int, str | None] = {}
        self._task: asyncio.Task | None = None

    def _user_of(self, p: psutil.Process) -> str | None:
        """The student a process serves; remembered once known (not before: a server caught between fork and
        exec still has the hub's environment)."""
        if p.pid not in self._users:
            try:
                user = p.environ().get("JUPYTERHUB_USER")
            except psutil.Error:
                return None
            if user is None:
                return None
            self._users[p.pid] = user
        return self._users[p.pid]

    def sample(self) -> None:
        trees: dict[str, list[psutil.Process]] = {}
        hub_rss = 0
        for p in self.hub.track():
            user = self._user_of(p)
            if user is None:
                try:
                    hub_rss += p.memory_info().rss
                except psutil.Error:
                    pass
            else:
                trees.setdefault(user, []).append(p)
        self.hub_rss_peak = max(self.hub_rss_peak, hub_rss)
        total_pss = 0
        for user, procs in trees.items():
            rss = pss = measured = kernels = 0
            for p in procs:
                try:  # a process may end, or be a zombie (a child not yet reaped), between two calls
                    cmdline = " ".join(p.cmdline())  # each time: a fork becomes a kernel at its exec
                    mem, cpu = p.memory_full_info(), p.cpu_times()
                except psutil.Error:
                    continue
                rss, pss, measured = rss + mem.rss, pss + mem.pss, measured + 1
                kernels += "ipykernel" in cmdline
                self._cpu[p.pid] = (user, cpu.user + cpu.system + cpu.children_user + cpu.children_system)
                proc = self.processes.setdefault(p.pid, {"rss_peak": 0})
                proc["cmdline"], proc["rss_peak"] = cmdline, max(proc["rss_peak"], mem.rss)
                proc["cpu_s"] = self._cpu[p.pid][1]
            tree = self.students.setdefault(user, TreeMemory())
            tree.rss_peak, tree.pss_peak = max(tree.rss_peak, rss), max(tree.pss_peak, pss)
            tree.processes_peak = max(tree.processes_peak, measured)
            tree.kernels_peak = max(tree.kernels_peak, kernels)
            total_pss += pss
        self.total_pss_peak = max(self.total_pss_peak, total_pss)
        for tree in self.students.values():
            tree.cpu_s = 0.0
        for user, cpu in self._cpu.values():
            self.students[user].cpu_s += cpu

    async def _loop(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        await asyncio.to_thread(self.sample)
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def _kernel_figures(sampler: MemorySampler, kernel_id: str) -> dict:
    """The peak RSS and CPU seconds of the kernel process whose connection file names `kernel_id`."""
    for proc in sampler.processes.values():
        if kernel_id and kernel_id in proc["cmdline"]:
            return {"kernel_rss_peak_mib": round(proc["rss_peak"] / 2**20, 1), "kernel_cpu_s": round(proc["cpu_s"], 1)}
    return {}


async def run_class(hub: Hub, notebooks: list[Path], *, interval_s: float = 1.0, cell_timeout_s: float = 600,
                    before_stop: Callable[[list[Student]], Awaitable[None]] | None = None
                    ) -> tuple[dict, list[Student]]:
    """Every student logs in, starts a server and runs `notebooks` one after another, all at the same time.

    A student's kernels stay open until every student has finished (as in class, where nobody shuts them down),
    so the memory peaks include all of a student's kernels. `before_stop(students)`, if given, runs then, while
    every server and kernel is still up (the test uses it to check that students cannot reach each other).

    Returns:
        A JSON-ready summary (one row per student, the class's wall time, the memory peaks) and the students
        (their notebooks' outputs are in ``student.runs``).
    """
    sampler = MemorySampler(hub, interval_s)
    sampler.start()
    students = [Student(hub.url, name, cell_timeout_s=cell_timeout_s) for name in hub.students]

    async def one(s: Student):
        t0 = time.monotonic()
        await s.login()
        await s.start_server()
        for nb in notebooks:
            await s.run_notebook(nb)
        s.timings["total_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    results = await asyncio.gather(*(one(s) for s in students), return_exceptions=True)
    wall_s = time.monotonic() - t0
    await sampler.stop()
    if before_stop is not None:
        await before_stop(students)
    for s in students:
        if s.token:
            try:
                await s.stop_server()
            except (HTTPClientError, OSError):
                pass
        s.http.close()
    rows = []
    for s, result in zip(students, results):
        mem = sampler.students.get(s.name, TreeMemory())
        failure = None if not isinstance(result, BaseException) else f"{type(result).__name__}: {result}"
        failure = failure or next((f"{r.path} {r.error}" for r in s.runs if r.error), None)
        rows.append({"student": s.name, **{k: round(v, 2) for k, v in s.timings.items()},
                     "notebooks": [{"path": r.path, "seconds": round(r.seconds, 2), "cells_run": r.cells_run,
                                    "cells": r.cells, "error": r.error, **_kernel_figures(sampler, r.kernel_id)}
                                   for r in s.runs],
                     "rss_peak_mib": round(mem.rss_peak / 2**20, 1), "pss_peak_mib": round(mem.pss_peak / 2**20, 1),
                     "processes_peak": mem.processes_peak, "kernels_peak": mem.kernels_peak,
                     "cpu_s": round(mem.cpu_s, 1), "failure": failure})
    return {"students": len(students), "wall_s": round(wall_s, 2), "rows": rows,
            "hub_and_proxy_rss_peak_mib": round(sampler.hub_rss_peak / 2**20, 1),
            "students_pss_peak_total_mib": round(sampler.total_pss_peak / 2**20, 1)}, students
