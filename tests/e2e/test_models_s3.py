"""Models between a models folder and S3 (moto in server mode, real files): push, pull, sync, and
what goes wrong: interruptions resume, concurrent pulls download once, corruption is caught, and a
missing bucket, a denied key and a full disk are clear errors that leave no half model behind."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from sdfleet.errors import ChecksumMismatch, NotFound
from sdfleet.models.layout import STATE_DIR
from sdfleet.models.progress import Silent
from sdfleet.models.remote import ModelBucket
from sdfleet.models.sync import ModelSync

MIB = 2**20
PART = 5 * MIB


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from sdfleet.cli import main; main()", *args],
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def bucket_url(moto_url: str) -> str:
    name = f"models-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_url).create_bucket(Bucket=name)
    return f"s3://{name}/models"


@contextlib.asynccontextmanager
async def sync_tool(root: Path, url: str, progress: Any = None, jobs: int = 4) -> AsyncIterator[ModelSync]:
    bucket = ModelBucket(url, jobs=jobs)
    try:
        yield ModelSync(root, bucket, progress or Silent(), part_size=PART, jobs=jobs)
    finally:
        bucket.close()


def random_model(root: Path, name: str, size: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_bytes(os.urandom(size))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def s3_object(url: str, path: str) -> dict[str, Any]:
    bucket, prefix = url[len("s3://") :].split("/", 1)
    got: dict[str, Any] = boto3.client("s3").get_object(Bucket=bucket, Key=f"{prefix}/{path}")
    return got


class StallAfter:
    """Progress that holds the transfer's worker thread once ``limit`` bytes have moved: the test
    then interrupts the transfer at a known point."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.moved = 0
        self.reached = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def start(self, label: str, total: int, done: int = 0) -> None:
        return None

    def advance(self, label: str, n: int) -> None:
        with self._lock:
            self.moved += n
            hit = self.moved >= self.limit
        if hit:
            self.reached.set()
            self.release.wait(60)

    def finish(self, label: str) -> None:
        return None


async def interrupt_when_stalled(work: asyncio.Task[Any], stall: StallAfter) -> None:
    assert await asyncio.to_thread(stall.reached.wait, 60), "the transfer never reached the stall point"
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    stall.release.set()


async def test_push_then_pull_a_folder_and_a_multipart_file(tmp_path: Path, bucket_url: str) -> None:
    from sdfleet.models.tiny import make_tiny

    src = tmp_path / "src"
    make_tiny(src, "tiny-a")
    big = random_model(src, "big.safetensors", 13 * MIB)  # three parts of 5, 5 and 3 MiB
    async with sync_tool(src, bucket_url) as tool:
        sent = await tool.push(src / "tiny-a") + await tool.push(big)
    files = [p for p in (src / "tiny-a").rglob("*") if p.is_file()]
    assert sent == big.stat().st_size + sum(p.stat().st_size for p in files)
    head = s3_object(bucket_url, "big.safetensors")
    assert head["Metadata"]["sha256"] == sha256(big)
    assert head["ETag"].strip('"').endswith("-3")  # really multipart

    dst = tmp_path / "dst"
    async with sync_tool(dst, bucket_url) as tool:
        folder = await tool.pull("tiny-a.safetensors")  # found by stem, as the catalog does
        single = await tool.pull("big")
    assert (folder.name, folder.files, single.name, single.fetched) == (
        "tiny-a",
        len(files),
        big.name,
        13 * MIB,
    )
    assert sha256(dst / "big.safetensors") == sha256(big)
    for f in files:
        assert (dst / f.relative_to(src)).read_bytes() == f.read_bytes()
    assert not (dst / STATE_DIR / "partial" / "big.safetensors").exists()

    listed = cli("models", "ls", "--remote", "--s3", bucket_url, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["big.safetensors"] == {
        "name": "big.safetensors",
        "kind": "single-file",
        "files": 1,
        "bytes": 13 * MIB,
    }
    assert rows["tiny-a"]["kind"] == "diffusers" and rows["tiny-a"]["files"] == len(files)

    again = cli("models", "pull", "big", "tiny-a", "--from", bucket_url, "--dir", str(dst), "--json")
    assert [r["files"] for r in json.loads(again.stdout)] == [0, 0]  # up to date: nothing moves
    # --s3 names the bucket in every models command (--to/--from/--remote: the older spellings)
    pushed = cli("models", "push", "big.safetensors", "--dir", str(src), "--s3", bucket_url, "--json")
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout) == {"models": [str(big)], "sent_bytes": 0}  # S3 has it
    missing = cli("models", "push", "nosuch", "--dir", str(src), "--s3", bucket_url)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: no such model file or folder, here or in {src}: nosuch"


async def test_an_interrupted_download_resumes_where_it_stopped(tmp_path: Path, bucket_url: str) -> None:
    big = random_model(tmp_path / "src", "big.safetensors", 13 * MIB)
    async with sync_tool(big.parent, bucket_url) as tool:
        await tool.push(big)
    dst = tmp_path / "dst"
    stall = StallAfter(PART + 1)  # the first part is written and recorded, the second has begun
    async with sync_tool(dst, bucket_url, stall, jobs=1) as tool:
        await interrupt_when_stalled(asyncio.create_task(tool.pull("big.safetensors")), stall)
    partial = dst / STATE_DIR / "partial" / "big.safetensors" / "big.safetensors.part"
    assert partial.exists() and not (dst / "big.safetensors").exists()
    assert json.loads(partial.with_name("big.safetensors.part.json").read_text())["done"] == [0]

    counted = Silent()
    async with sync_tool(dst, bucket_url, counted) as tool:
        result = await tool.pull("big.safetensors")
    assert result.fetched == counted.moved == 13 * MIB - PART
    assert sha256(dst / "big.safetensors") == sha256(big)
    assert not partial.exists()


async def test_an_interrupted_upload_resumes_with_the_parts_s3_has(tmp_path: Path, bucket_url: str) -> None:
    models = tmp_path / "models"
    big = random_model(models, "big.safetensors", 13 * MIB)
    stall = StallAfter(PART)  # the first part is on S3, the upload is not complete
    async with sync_tool(models, bucket_url, stall, jobs=1) as tool:
        await interrupt_when_stalled(asyncio.create_task(tool.push(big)), stall)
    bucket, prefix = bucket_url[len("s3://") :].split("/", 1)
    s3 = boto3.client("s3")
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)  # nothing visible yet
    assert len(s3.list_multipart_uploads(Bucket=bucket)["Uploads"]) == 1

    counted = Silent()
    async with sync_tool(models, bucket_url, counted) as tool:
        sent = await tool.push(big)
    assert sent == counted.moved == 13 * MIB - PART
    body = s3_object(bucket_url, "big.safetensors")
    assert hashlib.sha256(body["Body"].read()).hexdigest() == body["Metadata"]["sha256"] == sha256(big)
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


async def test_concurrent_pulls_of_one_model_download_it_once(tmp_path: Path, bucket_url: str) -> None:
    big = random_model(tmp_path / "src", "big.safetensors", 12 * MIB)
    async with sync_tool(big.parent, bucket_url) as tool:
        await tool.push(big)
    dst = tmp_path / "dst"
    bucket = ModelBucket(bucket_url)
    try:  # four pullers, each with its own lock file handle, as separate agents would have
        tools = [ModelSync(dst, bucket, Silent(), part_size=PART, jobs=2) for _ in range(4)]
        results = await asyncio.gather(*(t.pull("big") for t in tools))
    finally:
        bucket.close()
    assert sum(r.fetched for r in results) == 12 * MIB
    assert sorted(r.files for r in results) == [0, 0, 0, 1]
    assert all(r.waited_s > 0 for r in results if r.files == 0)
    assert sha256(dst / "big.safetensors") == sha256(big)


def test_concurrent_pull_processes_download_once(tmp_path: Path, bucket_url: str) -> None:
    big = random_model(tmp_path / "src", "big.safetensors", 24 * MIB)
    assert cli("models", "push", str(big), "--to", bucket_url).returncode == 0
    dst = tmp_path / "dst"
    command = [sys.executable, "-c", "from sdfleet.cli import main; main()", "models", "pull", "big"]
    command += ["--from", bucket_url, "--dir", str(dst), "--json"]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    results = [json.loads(out)[0] for out, _ in outputs]
    assert sum(r["fetched_bytes"] for r in results) == 24 * MIB
    assert sha256(dst / "big.safetensors") == sha256(big)


async def test_a_corrupted_download_is_detected_and_not_kept(tmp_path: Path, bucket_url: str) -> None:
    big = random_model(tmp_path / "src", "big.safetensors", 11 * MIB)
    async with sync_tool(big.parent, bucket_url) as tool:
        await tool.push(big)
    # The object's bytes change on S3 but its recorded checksum does not (bit rot, a bad copy).
    bucket, prefix = bucket_url[len("s3://") :].split("/", 1)
    boto3.client("s3").put_object(
        Bucket=bucket,
        Key=f"{prefix}/big.safetensors",
        Body=os.urandom(11 * MIB),
        Metadata={"sha256": sha256(big)},
    )
    dst = tmp_path / "dst"
    async with sync_tool(dst, bucket_url) as tool:
        with pytest.raises(ChecksumMismatch, match=r"big\.safetensors"):
            await tool.pull("big")
    assert not (dst / "big.safetensors").exists()
    assert not list((dst / STATE_DIR / "partial").rglob("*.part"))

    run = cli("models", "pull", "big", "--from", bucket_url, "--dir", str(dst))
    assert run.returncode == 2 and "sha256" in run.stderr and not (dst / "big.safetensors").exists()


async def test_a_partial_file_damaged_between_runs_is_caught_on_resume(
    tmp_path: Path, bucket_url: str
) -> None:
    big = random_model(tmp_path / "src", "big.safetensors", 13 * MIB)
    async with sync_tool(big.parent, bucket_url) as tool:
        await tool.push(big)
    dst = tmp_path / "dst"
    stall = StallAfter(PART + 1)
    async with sync_tool(dst, bucket_url, stall, jobs=1) as tool:
        await interrupt_when_stalled(asyncio.create_task(tool.pull("big")), stall)
    partial = dst / STATE_DIR / "partial" / "big.safetensors" / "big.safetensors.part"
    # Part 0 is recorded as done (two clean clones once saw the resume raise nothing: if it ever
    # does again, this says whether the part was recorded or the resume did not trust the record)
    assert json.loads(partial.with_name("big.safetensors.part.json").read_text())["done"] == [0]
    with partial.open("r+b") as f:  # a byte of the part that is recorded as done
        f.seek(1000)
        flipped = f.read(1)[0] ^ 0xFF
        f.seek(1000)  # the read moved on: the write went to byte 1001, the same by chance 1 in 256
        f.write(bytes([flipped]))
    async with sync_tool(dst, bucket_url) as tool:
        with pytest.raises(ChecksumMismatch):
            await tool.pull("big")
        assert not partial.exists()
        result = await tool.pull("big")  # a clean run from the start
    assert result.fetched == 13 * MIB and sha256(dst / "big.safetensors") == sha256(big)


async def test_a_missing_bucket_is_named(tmp_path: Path, moto_url: str) -> None:
    async with sync_tool(tmp_path, "s3://no-such-models-bucket/models") as tool:
        with pytest.raises(NotFound, match="bucket 'no-such-models-bucket' does not exist"):
            await tool.pull("anything")
    run = cli("models", "ls", "--remote", "--s3", "s3://no-such-models-bucket/x")
    assert run.returncode == 2 and "does not exist" in run.stderr


async def test_unknown_model_lists_what_the_bucket_has(tmp_path: Path, bucket_url: str) -> None:
    random_model(tmp_path / "src", "a.safetensors", 1000)
    async with sync_tool(tmp_path / "src", bucket_url) as tool:
        await tool.push(tmp_path / "src" / "a.safetensors")
        with pytest.raises(NotFound, match=r"'nope' is not in .*there: a.safetensors"):
            await tool.pull("nope")


@pytest.fixture(scope="module")
def moto_with_iam() -> Iterator[str]:
    """A moto_server that checks credentials and IAM policies after its first four requests."""
    exe = shutil.which("moto_server", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert exe is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    args = [exe, "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_denied_access_says_what_permission_is_missing(tmp_path: Path, moto_with_iam: str) -> None:
    endpoint = {"endpoint_url": moto_with_iam, "region_name": "us-east-1"}
    iam = boto3.client("iam", **endpoint)
    iam.create_user(UserName="lister")  # requests 1-4 pass unchecked, later ones need a key and a policy
    key = iam.create_access_key(UserName="lister")["AccessKey"]
    allowed = ["s3:ListBucket", "s3:CreateBucket", "s3:PutObject"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": allowed, "Resource": "*"}]}
    iam.put_user_policy(UserName="lister", PolicyName="no-get", PolicyDocument=json.dumps(policy))
    creds = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    s3 = boto3.client(
        "s3", **endpoint, aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"]
    )
    s3.create_bucket(Bucket="guarded-models")
    s3.put_object(Bucket="guarded-models", Key="m/a.safetensors", Body=b"x" * 1000)

    pull = ("models", "pull", "a", "--from", "s3://guarded-models/m", "--dir", str(tmp_path))
    run = cli(*pull, env={"AWS_ENDPOINT_URL": moto_with_iam, **creds})
    assert run.returncode == 2
    assert "access to s3://guarded-models/m denied (" in run.stderr
    assert "s3:GetObject" in run.stderr
    assert not (tmp_path / "a.safetensors").exists()
    unknown = {"AWS_ACCESS_KEY_ID": "AKIANOBODY", "AWS_SECRET_ACCESS_KEY": "x"}
    run = cli(*pull, env={"AWS_ENDPOINT_URL": moto_with_iam, **unknown})
    assert run.returncode == 2 and "denied (InvalidAccessKeyId)" in run.stderr


def test_a_full_disk_fails_before_writing_and_leaves_no_model(tmp_path: Path, bucket_url: str) -> None:
    big = random_model(tmp_path / "src", "big.safetensors", 12 * MIB)
    assert cli("models", "push", str(big), "--to", bucket_url).returncode == 0
    small = tmp_path / "small-disk"
    small.mkdir()
    # A 4 MiB tmpfs in a private mount namespace (no root needed where user namespaces are allowed).
    sdfleet = f"{sys.executable} -c 'from sdfleet.cli import main; main()'"
    pull = f"{sdfleet} models pull big --from {bucket_url} --dir {small}"
    script = f"mount -t tmpfs -o size=4m tmpfs {small} && {pull}; rc=$?; find {small} -type f; exit $rc"
    run = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert run.returncode == 2, run.stderr
    assert "needs 12.0 MiB more on disk" in run.stderr and "nothing was written under its name" in run.stderr
    assert f"{small}/big.safetensors" not in run.stdout


async def test_sync_moves_what_differs_both_ways(tmp_path: Path, bucket_url: str) -> None:
    here, there = tmp_path / "here", tmp_path / "there"
    random_model(here, "only-here.safetensors", 2000)
    random_model(there, "only-there.safetensors", 3000)
    random_model(there, "both.safetensors", 4000)
    async with sync_tool(there, bucket_url) as tool:
        await tool.push(there / "only-there.safetensors")
        await tool.push(there / "both.safetensors")
    shutil.copy(there / "both.safetensors", here / "both.safetensors")
    with (here / "both.safetensors").open("r+b") as f:  # same size, other bytes, newer here
        f.write(b"changed")

    dry = cli("models", "sync", "--remote", bucket_url, "--dir", str(here), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run: 3 file(s) would move" in dry.stdout
    dry = cli("models", "sync", "--s3", bucket_url, "--dir", str(here), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {
        "dry_run": True,
        "files": [
            {"op": "push", "model": "both.safetensors", "path": "both.safetensors", "bytes": 4000,
             "why": "differs, newer here"},
            {"op": "push", "model": "only-here.safetensors", "path": "only-here.safetensors", "bytes": 2000,
             "why": "not on S3"},
            {"op": "pull", "model": "only-there.safetensors", "path": "only-there.safetensors", "bytes": 3000,
             "why": "not here"},
        ],
        "fetched_bytes": 0,
        "sent_bytes": 0,
    }  # fmt: skip
    async with sync_tool(here, bucket_url) as tool:
        plan = await tool.plan()
        assert [(a.op, a.path, a.reason) for a in plan] == [
            ("push", "both.safetensors", "differs, newer here"),
            ("push", "only-here.safetensors", "not on S3"),
            ("pull", "only-there.safetensors", "not here"),
        ]
        assert [a.op for a in await tool.plan("down")] == ["pull", "pull"]
        fetched, sent = await tool.apply(plan)
        assert (fetched, sent) == (3000, 6000)
        assert await tool.plan() == []
    assert sha256(here / "only-there.safetensors") == sha256(there / "only-there.safetensors")
    body = s3_object(bucket_url, "both.safetensors")["Body"].read()
    assert body == (here / "both.safetensors").read_bytes()
