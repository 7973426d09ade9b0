"""tune.progress and the training metrics: a real Prometheus scrapes a smoke search through Ray's service discovery,
and every panel of cluster/grafana-training.json finds data."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus")
pytestmark = [pytest.mark.timeout(600), pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed")]


def query_range(port: int, expr: str, start: float) -> list:
    """The series ``expr`` had from ``start`` until now, at one-second steps, through Prometheus's HTTP API."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": time.time(), "step": "1s"})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query_range?{params}", timeout=10) as answer:
        return json.loads(answer.read())["data"]["result"]


def test_every_training_panel_finds_data(ray_session, tmp_path):
    """A smoke search on the session's Ray, scraped every second by a real Prometheus that finds Ray's nodes in the
    service discovery file Ray writes: every query of the training dashboard returns data (images/s, data-wait
    share, loss, pixel_exact and IoU, epoch seconds per worker; the search's trials by state and best so far), and
    the console shows one line per trial result, with no Tune status table or Train report dumps."""
    discovery = (
        Path(ray_session._private.worker._global_node.get_temp_dir_path()) / "prom_metrics_service_discovery.json"
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: ray, file_sd_configs: [{{files: ['{discovery}'], refresh_interval: 1s}}]}}]\n"
    )
    port = free_port()
    command = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    prometheus = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        start = time.time()
        env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
        search = [
            sys.executable,
            "-m",
            "tune.search",
            "--smoke-test",
            "--num-samples",
            "2",
            "--storage",
            str(tmp_path),
            "--name",
            "watched",
        ]
        done = subprocess.run(search, env=env, cwd=ROOT, capture_output=True, text=True, timeout=500)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        lines = [line for line in done.stdout.splitlines() if line.startswith("[search] trial ")]
        assert lines and all("pixel_exact" in line and "img/s" in line for line in lines)
        assert len(lines) == len(set(lines))  # each once
        assert "TrainingReport(" not in done.stdout + done.stderr and "Trial status" not in done.stdout
        dashboard = json.loads((ROOT / "cluster" / "grafana-training.json").read_text())
        queries = [
            t["expr"].replace("$run", ".*").replace("$search", ".*") for p in dashboard["panels"] for t in p["targets"]
        ]
        deadline, missing = time.time() + 60, queries
        while missing and time.time() < deadline:
            time.sleep(2)
            missing = [q for q in missing if not query_range(port, q, start)]
        assert not missing, f"no data within 60 s for {missing}"
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
