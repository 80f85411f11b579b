"""Shared fixtures: real services started on 127.0.0.1 with free ports, stopped by PID."""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# One torch thread per process, in the test workers and every process they start. Four workers and
# their agents, servers and browsers share two cores; torch's OpenMP threads spin while they wait for
# each other, and under that load burnt the CPU the other tests needed: 100 steps of the tiny model
# took 21 s of CPU (28 s wall) on two threads beside three busy processes, 1.4 s (2.6 s) on one.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# Long interop, fuzzing and bench runs: `make test-slow` runs them, `make test` (CI) leaves them out so
# the default suite stays within its time on two cores. Each has a faster sibling in the default suite
# (the sqlite variant of an engine-parametrised flow, the CLI and walkthrough tests for the demo);
# so do the redis and aws variants of tests marked ``flow`` (``_flow_off_sqlite``).
SLOW = (
    "tests/e2e/test_cli.py::test_demo_prints_two_pngs_of_the_asked_sizes",  # `make demo` runs it too
    "tests/e2e/test_aws_engine.py::test_agent_drains_seed_queue_in_place*",
    "tests/e2e/test_seed_flow.py::test_v1alpha*_examples[[]redis[]]",
    "tests/e2e/test_seed_flow.py::test_v1alpha*_examples[[]aws[]]",
    "tests/e2e/test_models_hub.py::test_the_demo_runs_on_a_pulled_model",
    "tests/unit/test_bench.py::test_agent_batching_through_the_agent",
    "tests/e2e/test_lost_replies.py::test_no_task_is_left_without_an_outcome_when_its_receives_run_out*",
    "tests/e2e/test_dead_letters.py::test_a_task_that_kills_its_agent_on_each_try_fails_and_is_told[[]redis[]]",
    "tests/e2e/test_dead_letters.py::test_a_task_that_kills_its_agent_on_each_try_fails_and_is_told[[]aws[]]",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(fnmatch(item.nodeid, pattern) for pattern in SLOW) or _flow_off_sqlite(item):
            item.add_marker(pytest.mark.slow)


def _flow_off_sqlite(item: pytest.Item) -> bool:
    """A ``flow`` test's subject is the fleet's own logic (the agent's stages, the API, batching,
    outputs), which runs the same on every engine: `make test` runs it on sqlite and `make test-slow`
    on redis and aws as well. What each engine itself does (leases, redelivery, conditional writes,
    filter policies, dead letters) is `tests/contract`'s and the engine-bound e2e files', on every
    engine in `make test`; ``flow(engines="all")`` keeps a flow there too, where an engine carries
    its guarantee."""
    marker = item.get_closest_marker("flow")
    callspec = getattr(item, "callspec", None)
    if marker is None or marker.kwargs.get("engines") == "all" or callspec is None:
        return False
    return callspec.params.get("engine", "sqlite") != "sqlite"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisServer:
    """A real redis-server on a free port; ``restart()`` keeps its data dir (appendonly)."""

    def __init__(self, workdir: Path, appendonly: bool = True, args: tuple[str, ...] = ()) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: apt-get install redis-server")
        self.exe = exe
        self.workdir = workdir
        self.appendonly = appendonly
        self.args = args
        """More ``redis-server`` arguments (``--maxmemory`` ...)."""
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        args += ["--save", "", "--appendonly", "yes" if self.appendonly else "no", "--protected-mode", "no"]
        args += self.args
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


ReadOnly = Callable[[Path], Path]


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[ReadOnly]:
    """Makes a folder the test filled read-only, as the chart mounts models; returns the path to
    read it by. As root (CI), a read-only bind mount: the writes fail with EROFS as on the chart's
    volume. Otherwise the folder's write permission is taken away (the writes fail with EACCES)."""
    undo: list[list[str]] = []
    chmodded: list[Path] = []

    def make(folder: Path) -> Path:
        if os.geteuid() != 0:
            for path in [folder, *folder.rglob("*")]:
                path.chmod(path.stat().st_mode & ~0o222)
            chmodded.append(folder)
            return folder
        mnt = tmp_path / f"{folder.name}-ro"
        mnt.mkdir()
        subprocess.run(["mount", "--bind", str(folder), str(mnt)], check=True, capture_output=True)
        undo.append(["umount", str(mnt)])
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True, capture_output=True)
        return mnt

    try:
        yield make
    finally:
        if undo:
            # A closed diffusers runtime leaves its pipelines, which map the model files, to the
            # garbage collector (a full collection at close cost each fleet 0.4 s): the mount
            # stays busy until they are collected.
            gc.collect()
        for command in undo:
            subprocess.run(command, check=True)
        for folder in chmodded:
            for path in [folder, *folder.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """``moto_server`` in server mode: SNS, SQS, S3, DynamoDB over real HTTP on 127.0.0.1 (its
    DynamoDB writes atomic, as DynamoDB's are: see ``tests/moto_server.py``)."""
    if importlib.util.find_spec("flask") is None:
        raise RuntimeError("moto's server is not installed: pip install 'moto[server]'")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("moto_server.py")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    url = f"http://127.0.0.1:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = url
    yield url
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old
    _stop(proc)
