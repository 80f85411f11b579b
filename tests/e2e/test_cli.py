"""The command line as a person uses it: subprocesses, real HTTP, the README's commands."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from conftest import SD15, free_port
from sdfleet import media
from sdfleet.models.tiny import make_tiny

pytestmark = pytest.mark.timeout(300)
SDFLEET = [sys.executable, "-m", "sdfleet"]


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SDFLEET, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    # A folder name that a URL must quote: unquoted, '#' cut the bus's file short and every task
    # failed to store its images (the files URL pointed into that file).
    env = {**os.environ, "SDFLEET_DATA_DIR": str(tmp_path / "my #1 50% data"), "COLUMNS": "80"}
    env["SDFLEET_LOG_JSON"] = "true"
    return env


def test_models_make_tiny_and_list(tmp_path: Path, cli_env: dict[str, str]) -> None:
    import numpy
    from safetensors.numpy import save_file

    made = _run(["models", "make-tiny", "cli-tiny", "--dir", str(tmp_path / "models")], cli_env)
    assert made.returncode == 0, made.stderr
    assert "noise" in made.stdout  # a person is told the images are noise
    again = _run(["models", "make-tiny", "cli-tiny", "--dir", str(tmp_path / "models")], cli_env)
    assert again.returncode == 0, again.stderr  # a tiny model is made again in place
    refiner = _run(
        ["models", "make-tiny", "cli-refiner", "--sdxl-refiner", "--dir", str(tmp_path / "models")], cli_env
    )
    assert refiner.returncode == 0, refiner.stderr
    index = json.loads((tmp_path / "models" / "cli-refiner" / "model_index.json").read_text())
    assert index["requires_aesthetics_score"] is True and index["text_encoder"] == [None, None]
    both = _run(
        ["models", "make-tiny", "x", "--sdxl", "--sdxl-refiner", "--dir", str(tmp_path / "models")], cli_env
    )
    _one_error_line(both, "a tiny model is of one family")
    # A real model of that name is never written over (it was, with random weights).
    real = tmp_path / "models" / "real"
    real.mkdir()
    (real / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    real_file = tmp_path / "models" / "real-file.safetensors"
    save_file({"w": numpy.zeros(1)}, str(real_file))  # a checkpoint without make-tiny's metadata
    before = real_file.read_bytes()
    for args in (["real"], ["real-file", "--single-file"]):
        refused = _run(["models", "make-tiny", *args, "--dir", str(tmp_path / "models")], cli_env)
        _one_error_line(refused, "exists and is not a tiny test model; give another name")
    assert sorted(p.name for p in real.iterdir()) == ["model_index.json"] and real_file.read_bytes() == before
    config = tmp_path / "sdfleet.yaml"
    config.write_text(yaml.safe_dump({"models": {"dir": str(tmp_path / "models")}}))
    listed = _run(["models", "list", "-c", str(config)], cli_env)
    assert listed.returncode == 0, listed.stderr
    assert "cli-tiny" in listed.stdout and "diffusers" in listed.stdout and "yes" in listed.stdout
    assert listed.stderr == ""
    config.write_text(yaml.safe_dump({"models": {"dir": str(tmp_path / "nowhere")}}))
    empty = _run(["models", "list", "-c", str(config)], cli_env)  # listing nothing is not an error
    assert empty.returncode == 0 and empty.stderr == "", empty.stderr  # the line, not an empty frame
    how = "`sdfleet models make-tiny NAME`, `sdfleet models pull`, or models.s3"
    assert empty.stdout == f"no models in {tmp_path / 'nowhere'} (the folder does not exist): {how}\n"
    # --dir, as the other models commands take it (it was "No such option")
    named = _run(["models", "list", "--dir", str(tmp_path / "models"), "-c", str(config), "--json"], cli_env)
    assert named.returncode == 0, named.stderr
    assert "cli-tiny" in [m["name"] for m in json.loads(named.stdout)["models"]]
    empty = _run(["models", "ls", "-c", str(config)], cli_env)
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout == f"no models in {tmp_path / 'nowhere'} (the folder does not exist): {how}\n"


def test_up_submit_status_queues(tmp_path: Path, cli_env: dict[str, str]) -> None:
    make_tiny(tmp_path / "models", Path(SD15).stem)
    config = tmp_path / "sdfleet.yaml"
    fleet = {
        "queues": [{"name": "sd15", "filter": {"sd_model_checkpoint": [SD15]}}],
        "models": {"dir": str(tmp_path / "models"), "default": SD15},
    }
    config.write_text(yaml.safe_dump(fleet))
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    up = subprocess.Popen(
        [*SDFLEET, "up", "-c", str(config), "--port", str(port)],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_ready(api, up)
        submitted = _run(
            [
                "submit",
                "--prompt",
                "a boat",
                "--steps",
                "2",
                "--width",
                "64",
                "--height",
                "64",
                "--priority",
                "4",
                "--output-format",
                "webp",
                "--negative-prompt",
                "blurry",
                "--cfg",
                "5.5",
                "--sampler",
                "Euler a",
                "--batch-size",
                "2",
                "--ttl",
                "3600",
                "--wait",
                "--api",
                api,
            ],
            cli_env,
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        task_id = re.search(r"submitted (\S+)", submitted.stdout)
        assert task_id is not None, submitted.stdout
        assert "succeeded" in submitted.stdout and "priority 4" in submitted.stdout
        links = re.findall(rf"{task_id.group(1)}-[0-9a-f]{{4}}-[12]\.webp\s+(\S+)", submitted.stdout)
        assert len(links) == 2, submitted.stdout  # --batch-size 2
        stored = Image.open(io.BytesIO(httpx.get(links[1], timeout=10).content))
        said = media.infotext(stored) or ""
        assert said.startswith("a boat\nNegative prompt: blurry\n"), said
        assert "Sampler: Euler a," in said and "CFG scale: 5.5," in said, said
        data = Path(cli_env["SDFLEET_DATA_DIR"])  # the bus, the store and the files all in it
        assert {p.name for p in tmp_path.iterdir()} == {data.name, "models", "sdfleet.yaml"}
        assert len(list((data / "files").glob(f"*/{task_id.group(1)}/*.webp"))) == 2
        status = _run(["status", task_id.group(1), "--api", api, "--json"], cli_env)
        assert status.returncode == 0, status.stderr
        view = json.loads(status.stdout)
        assert view["state"] == "succeeded" and view["queue"] == "sd15" and view["priority"] == 4
        assert view["ttl_s"] == 3600
        queues = _run(["queues", "-c", str(config)], cli_env)
        assert queues.returncode == 0, queues.stderr
        assert re.search(r"sd15\s+.*diffusers\s+.*0\s+.*0", queues.stdout), queues.stdout
        hooked = _run(
            ["submit", "--prompt", "x", "--webhook", "http://127.0.0.1:9/hook", "--api", api], cli_env
        )
        assert hooked.returncode == 2 and "webhook URL refused" in hooked.stderr, hooked.stderr  # it was sent
        none = _run(["tasks", "--state", "failed", "--api", api], cli_env)
        assert none.returncode == 0 and none.stdout == "no failed tasks\n", none.stdout
        missing = _run(["status", "no-such-task", "--api", api], cli_env)
        assert missing.returncode == 2 and "not found" in missing.stderr
        _ctrl_c_stops_the_waiting_not_the_task(api, cli_env)
    finally:
        up.send_signal(signal.SIGTERM)
        _out, err = up.communicate(timeout=60)
    assert up.returncode == 0, err[-2000:]
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in logs)


def _ctrl_c_stops_the_waiting_not_the_task(api: str, env: dict[str, str]) -> None:
    """``submit --wait --json`` prints nothing until the end: on Ctrl-C it names the task it leaves
    running, which goes on."""
    before = set(_task_ids(api))
    args = ["submit", "--prompt", "a long one", "--steps", "150", "--wait", "--json", "--api", api]
    waiting = subprocess.Popen(
        [*SDFLEET, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's Ctrl-C
    )
    deadline = time.monotonic() + 60
    while not (new := set(_task_ids(api)) - before):
        assert time.monotonic() < deadline and waiting.poll() is None, waiting.communicate()
        time.sleep(0.1)
    waiting.send_signal(signal.SIGINT)
    out, err = waiting.communicate(timeout=60)
    (task_id,) = new
    assert waiting.returncode == 130 and out == "", (out, err)
    assert f"stopped waiting; task {task_id} goes on: `sdfleet status {task_id}` shows it" in err, err
    view = httpx.get(f"{api}/v1/tasks/{task_id}", timeout=10).json()
    assert view["state"] in ("queued", "running"), view
    assert _run(["cancel", task_id, "--api", api], env).returncode == 0


def _task_ids(api: str) -> list[str]:
    return [t["id"] for t in httpx.get(f"{api}/v1/tasks", timeout=10).json()["tasks"]]


def _wait_ready(api: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if httpx.get(f"{api}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("sdfleet up did not become ready")


def test_demo_prints_two_pngs_of_the_asked_sizes(tmp_path: Path, cli_env: dict[str, str]) -> None:
    demo = _run(["demo", "--data-dir", str(tmp_path / "demo")], cli_env, timeout=280)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    # One line per image, its path whole at 80 columns; piped, no progress bars and no warnings
    found = re.findall(r"^\S+: (\S+\.png) \((\d+)x(\d+) PNG, queue \w+\)$", demo.stdout, flags=re.M)
    assert [(int(w), int(h)) for _, w, h in found] == [(768, 768), (512, 512)], demo.stdout
    for path, _, _ in found:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "noise from a tiny test model" in demo.stdout
    assert "━" not in demo.stdout and "warning" not in demo.stderr.lower(), demo.stderr


LOG_RECORD = re.compile(r'\{"ts": |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ')


def _one_error_line(proc: subprocess.CompletedProcess[str], words: str) -> None:
    """A person's mistake: exit 2 and one ``error:`` line naming it, never a traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr and "╭─" not in proc.stderr, proc.stderr[-1500:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], proc.stderr[-1500:]
    # and nothing else but log records (JSON or text): a message that goes on over lines is not one
    rest = [line for line in proc.stderr.splitlines() if not line.startswith("error:")]
    assert all(LOG_RECORD.match(line) for line in rest), proc.stderr[-1500:]


def test_mistakes_are_one_line_errors_from_every_command(tmp_path: Path, cli_env: dict[str, str]) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("queues: [\n  - name: x\n")
    bad_name = tmp_path / "bad-name.yaml"
    bad_name.write_text(yaml.safe_dump({"queues": [{"name": "Bad_Name"}]}))
    typo = tmp_path / "typo.yaml"
    typo.write_text("quuues: []\n")
    twice = tmp_path / "twice.yaml"
    twice.write_text(yaml.safe_dump({"queues": [{"name": "a"}, {"name": "a"}]}))
    long_lease = tmp_path / "long-lease.yaml"
    long_lease.write_text(yaml.safe_dump({"retry": {"lease_s": 50000}}))  # past SQS's 12 hours
    not_json = tmp_path / "task.json"
    not_json.write_text("{nope")
    for args, words in [
        (["queues", "-c", str(bad_yaml)], "YAML: line 2, column 3: expected the node content, but found '-'"),
        (["up", "-c", str(bad_yaml)], "not valid YAML"),
        (["queues", "-c", str(twice)], f"{twice}: queue names must be unique: ['a', 'a']"),
        (["agent", "--queue", "x", "-c", str(bad_name)], "Bad_Name"),
        (
            ["agent", "--queue", "default", "--ready-dir", str(not_json)],
            f"--ready-dir {not_json}: a file, not a folder",
        ),
        (["ensure", "-c", str(tmp_path / "nope.yaml")], "nope.yaml"),
        (["models", "list", "-c", str(bad_yaml)], "not valid YAML"),
        (["keys", "list", "-c", str(bad_yaml)], "not valid YAML"),
        (["submit", "--file", str(tmp_path / "missing.json")], "No such file or directory"),
        (["submit", "--file", str(not_json)], "not JSON"),
        (["submit", "--file", str(tmp_path)], "Is a directory"),
        (["status", ""], "is not a task id"),
        (["tasks", "--api", "localhost:8080"], "API URL 'localhost:8080': use http://host:port"),  # no scheme
        (["status", "a?b"], "is not a task id"),
        (["deploy", "values", "--engine", "redis"], "--redis-address"),
        (["models", "make-tiny", "../evil", "--dir", str(tmp_path / "models")], "is not a model name"),
        (["models", "make-tiny", "m", "--no-sidecar", "--dir", str(tmp_path / "models")], "--single-file"),
        (["submit", "--prompt", "x", "--file", str(not_json)], "not both"),
        (["models", "push", "m", "-j", "0"], "'--jobs' / '-j': Input should be greater than or equal to 1"),
        (  # they were dropped without a word: the body was sent as it was
            ["submit", "--file", str(not_json), "--steps", "4", "--model", "m"],
            "--model, --steps: a --file body carries its own parameters; set them there",
        ),
        (["demo", "--steps", "3"], "only with --model"),
        (["demo", "--data-dir", str(not_json)], f"--data-dir {not_json}: a file, not a folder"),
        # refused before the fleet starts and loads the model; 0 was taken as "not given"
        (["demo", "--model", "m", "--size", "13"], "--size: must be a multiple of 8, got 13"),
        (
            ["keys", "create", "--tenant", "t", "--rate", "-5"],
            "--rate: Input should be greater than 0 (got -5.0)",
        ),
        (
            ["demo", "--model", "m", "--steps", "0"],
            "--steps: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            ["demo", "--model", "m", "--size", "0"],
            "--size: Input should be greater than or equal to 8 (got 0)",
        ),
        (["queues", "-c", str(typo)], "quuues"),
        (["ensure", "-c", str(long_lease)], "retry.lease_s: Input should be less than or equal to 43200"),
        (["agent", "--queue", "default", "--runtime", "nosuchmod:Cls"], "no module named 'nosuchmod'"),
        (["runtime", "serve", "--device", "tpu", "--port", "0"], "use cpu, cuda, cuda:N or auto"),
        (
            ["agent", "--queue", "default", "--runtime", "a1111", "--runtime-url", "ftp://sd"],
            "SD WebUI URL 'ftp://sd'",
        ),
    ]:
        _one_error_line(_run(args, cli_env), words)
    for var, value, words in [
        ("SDFLEET_LOG_LEVEL", "bogus", "SDFLEET_LOG_LEVEL"),
        ("SDFLEET_API__PORT", "abc", "SDFLEET_API__PORT"),
        ("SDFLEET_API__PORT", "83616", "less than or equal to 65535"),
    ]:
        _one_error_line(_run(["queues"], {**cli_env, var: value}), words)
    beats_late = {**cli_env, "SDFLEET_AGENT__HEARTBEAT_S": "60"}  # the lease is 60 s
    late = _run(["agent", "--queue", "default"], beats_late)
    _one_error_line(late, "must be shorter than the lease")
    assert late.stderr.count("\n") == 1, late.stderr  # before any runtime is built (and logs)
    fresh = {**cli_env, "SDFLEET_DATA_DIR": str(tmp_path / "fresh")}  # no topology yet
    _one_error_line(_run(["queues"], fresh), "sdfleet ensure")
    _one_error_line(_run(["dlq", "list"], fresh), "queue 'default' does not exist: create the fleet's queues")
    assert not (tmp_path / "evil").exists()
    # click's own checks too: one line, not typer's framed panel under the usage
    for args, words in [
        (
            ["up", "--port", "83616"],
            "Invalid value for '--port': Input should be less than or equal to 65535",
        ),
        (
            ["ensure", "--wait", "-1"],
            "Invalid value for '--wait': Input should be greater than or equal to 0",
        ),
        (["status"], "Missing argument 'task_id' (see 'python -m sdfleet status -h')"),
        (["tasks", "--bogus"], "No such option: --bogus"),
        (["bogus"], "No such command 'bogus'"),
    ]:
        _one_error_line(_run(args, cli_env), words)


def test_a_busy_port_is_named(tmp_path: Path, cli_env: dict[str, str]) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        for args in (["up", "--port", str(port)], ["api", "--port", str(port)]):
            proc = _run(args, {**cli_env, "SDFLEET_LOG_JSON": "false"})
            _one_error_line(proc, f"127.0.0.1:{port}")
            # refused before the agents start: no model loaded, no bus closed under them
            assert proc.stderr.count("\n") == 1, proc.stderr[-1500:]


def test_port_0_listens_on_a_free_port_and_says_which(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """``--port 0`` was read as "not given": the API took 8080 (or failed on it when busy)."""
    api = subprocess.Popen(
        [*SDFLEET, "api", "--port", "0"],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert api.stderr is not None
        for line in api.stderr:
            if found := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
                break
        else:
            raise AssertionError("the API never said where it listens")
        port = int(found.group(1))
        assert port not in (0, 8080)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    finally:
        api.send_signal(signal.SIGTERM)
        api.communicate(timeout=60)


@pytest.mark.parametrize("runtime", ["a1111", "comfyui"])
def test_sigterm_while_waiting_for_the_server_ends_the_agent(
    tmp_path: Path, cli_env: dict[str, str], runtime: str
) -> None:
    """A side-car agent whose SD WebUI / ComfyUI is not up yet (minutes of ready_timeout_s)."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    agent = subprocess.Popen(
        [*SDFLEET, "agent", "--queue", "default", "--runtime", runtime, "--runtime-url", url],
        env=cli_env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(6)  # past start-up: polling the server
    assert agent.poll() is None, agent.stderr.read() if agent.stderr else ""
    t0 = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    _out, err = agent.communicate(timeout=30)
    assert agent.returncode == 0 and time.monotonic() - t0 < 10, err[-1500:]
    assert "stopped before the runtime was ready" in err, err[-1500:]
    what = {"a1111": "SD WebUI", "comfyui": "ComfyUI"}[runtime]
    assert f"waiting for {what} at {url} (0 of 300 s)" in err, err[-1500:]  # said at once, not after 5 min


def test_keys_list_json_is_one_document_and_its_table_keeps_ids_whole(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    env = {**cli_env, "COLUMNS": "60"}
    none = _run(["keys", "list"], env)
    assert (
        none.returncode == 0
        and none.stdout == "no stored keys (`sdfleet keys create --tenant T` makes one)\n"
    )
    made = [_run(["keys", "create", "--tenant", f"tenant-with-a-long-name-{i}"], env) for i in range(2)]
    assert all(m.returncode == 0 for m in made), [m.stderr for m in made]
    listed = _run(["keys", "list", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    keys = json.loads(listed.stdout)
    assert [k["tenant"] for k in sorted(keys, key=lambda k: k["tenant"])] == [
        "tenant-with-a-long-name-0",
        "tenant-with-a-long-name-1",
    ]
    table = _run(["keys", "list"], env)
    assert table.returncode == 0 and "…" not in table.stdout, table.stdout
    for k in keys:
        assert k["id"] in table.stdout and k["tenant"] in table.stdout, table.stdout
    # for scripts: the key and what it was stored with, in one document
    made = _run(["keys", "create", "--tenant", "scripted", "--tier", "paid", "--rate", "2", "--json"], env)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert key["key"].startswith(f"sdf_{key['id']}_") and "digest" not in key
    assert (key["tenant"], key["tier"], key["rate_limit"]) == ("scripted", "paid", 2.0)
    assert key["id"] in _run(["keys", "list"], env).stdout


def test_make_tiny_single_file_takes_the_name_with_or_without_its_extension(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    models = tmp_path / "models"
    made = _run(["models", "make-tiny", "sf.safetensors", "--single-file", "--dir", str(models)], cli_env)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in models.iterdir()) == ["sf.config", "sf.safetensors"]


def test_reading_a_fleet_that_does_not_exist_leaves_no_files(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """``queues``, ``dlq list`` and ``keys list`` in the wrong folder made its ``sdfleet-data/``
    database before saying there was nothing there."""
    data = Path(cli_env["SDFLEET_DATA_DIR"])
    for args, words in [
        (["queues"], "queue 'default' does not exist: create the fleet's queues with `sdfleet ensure`"),
        (["dlq", "list"], "queue 'default' does not exist"),
        (["keys", "list"], "no stored keys"),
    ]:
        done = _run(args, cli_env)
        assert words in done.stdout + done.stderr, (args, done.stdout, done.stderr)
        assert not data.exists(), args
    assert _run(["ensure"], cli_env).returncode == 0  # what writes makes it, as before
    assert "default" in _run(["queues"], cli_env).stdout
