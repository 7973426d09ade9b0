"""cluster/: every config validates against the schema its tool uses, and names things that exist."""

import copy
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from polycolor import storage
from polycolor.data import REAL_PALETTE

RAY = str(Path(sys.executable).with_name("ray"))  # the Ray CLI this interpreter installed, not the first on PATH
ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
MANIFESTS = {
    "raycluster.yaml": "ray.io_rayclusters.yaml",
    "rayjob.yaml": "ray.io_rayjobs.yaml",
    "rayservice.yaml": "ray.io_rayservices.yaml",
}


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs_pass_ray_up_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    head, worker = config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]
    assert "--dashboard-host=127.0.0.1" in head  # never opened to the internet: `ray dashboard` forwards it
    assert head.startswith("RAY_AUTH_MODE=token ") and worker.startswith(
        "RAY_AUTH_MODE=token "
    )  # token auth, said explicitly
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token on every node
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])
    from tune.search import DRIVER_RESOURCE

    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"][DRIVER_RESOURCE] >= 1  # Tune's trial drivers live on the head
    workers = [n for k, n in nodes.items() if k != config["head_node_type"]]
    assert all(DRIVER_RESOURCE not in n["resources"] for n in workers)
    spot = [
        n["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        or any(s.get("provisioningModel") == "SPOT" for s in n["node_config"].get("scheduling", []))
        for n in workers
    ]
    assert all(spot)  # GPU workers on spot capacity; the head (drivers, controllers) never is


def test_trial_drivers_ask_for_the_head_resource_if_offered():
    """Trial drivers ask for the head resource only where the cluster has it."""
    from tune.search import DRIVER_RESOURCE, driver_resources

    assert driver_resources({"CPU": 8.0}) == {"CPU": 0.25}  # a laptop: no such resource
    assert driver_resources({"CPU": 8.0, DRIVER_RESOURCE: 100.0}) == {"CPU": 0.25, DRIVER_RESOURCE: 1}


def strict(schema):
    """CRD schemas accept unknown fields; refuse them so typos fail, and map int-or-string."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if schema.pop("x-kubernetes-int-or-string", False):
            schema.pop("type", None)
            schema["type"] = ["integer", "string"]
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_schema(file: str) -> dict:
    if not (SCHEMAS / file).is_file():
        pytest.skip(f"KubeRay schemas not found at {SCHEMAS}")
    crd = yaml.safe_load((SCHEMAS / file).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is not in the CRD
    return schema


@pytest.mark.parametrize("manifest, schema_file", MANIFESTS.items())
def test_kuberay_manifests_validate_strictly(manifest, schema_file):
    import jsonschema

    document = yaml.safe_load((ROOT / "cluster" / "kuberay" / manifest).read_text())
    jsonschema.validate(document, crd_schema(schema_file))
    cluster = document["spec"].get("rayClusterSpec") or document["spec"].get("rayClusterConfig") or document["spec"]
    assert cluster["rayVersion"].startswith("2.60")
    assert cluster["authOptions"]["mode"] == "token"
    # Reachable by the operator and the RayJob submitter through the head Service, which stays inside the cluster.
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"


def test_strict_schema_catches_a_typo():
    import jsonschema

    document = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    document["spec"]["rayVersoin"] = "2.60.0"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, crd_schema("ray.io_rayclusters.yaml"))


def test_serve_configs_validate_and_import():
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    for config in (
        yaml.safe_load(service["spec"]["serveConfigV2"]),
        yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text()),
    ):
        schema = ServeDeploySchema.model_validate(config)
        for application in schema.applications:
            module, attribute = application.import_path.split(":")
            assert callable(getattr(__import__(module, fromlist=[attribute]), attribute))
            from polycolor.serve import ServeConfig

            ServeConfig.from_args({k: v for k, v in application.args.items()})  # every arg is known
            (colorizer,) = application.deployments  # the checkpoint: in user_config, so a new one swaps in place
            assert (
                colorizer.name == "Model"
                and colorizer.user_config["checkpoint"]
                and "checkpoint" not in application.args
            )
    assert yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())["http_options"]["host"] == "127.0.0.1"
    # The RayService is reachable from the cluster's pods: it asks for an API key (from a Secret) and bounds requests.
    assert yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["request_timeout_s"] > 0
    pods = [
        service["spec"]["rayClusterConfig"]["headGroupSpec"],
        *service["spec"]["rayClusterConfig"]["workerGroupSpecs"],
    ]
    for pod in pods:
        (container,) = pod["template"]["spec"]["containers"]
        assert {
            "name": "POLYCOLOR_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "polycolor-api-key", "key": "key"}},
        } in container["env"]


def test_named_commands_answer_help(capsys):
    import importlib

    job = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert job["spec"]["entrypoint"].startswith("python -m tune.search")
    for module in (
        "polycolor.train",
        "polycolor.serve",
        "polycolor.predict",
        "polycolor.evaluate",
        "polycolor.data",
        "polycolor.synth",
    ):
        with pytest.raises(SystemExit) as done:
            importlib.import_module(module).main(["--help"])
        assert done.value.code == 0 and "usage: python -m " + module in capsys.readouterr().out, module
    flags = subprocess.run(
        [sys.executable, "-m", "tune.search", "--help"], capture_output=True, text=True, cwd=ROOT
    ).stdout  # as the job runs it
    for flag in job["spec"]["entrypoint"].split():
        if flag.startswith("--"):
            assert flag in flags, flag


# ---------------------------------------------------------------------------------------------------
# KubeRay pods on separate addresses: each manifest's head started as the operator starts it, on one test host,
# and reached from another the way the operator and the RayJob submitter pod reach it.

TOKEN = "kuberay-secret-token-for-tests"


def head_command(params: dict, ip: str, temp_dir: str) -> list[str]:
    """`ray start --head` as KubeRay builds it from ``rayStartParams`` (adding --dashboard-host=0.0.0.0 unless set)."""
    params = {"dashboard-host": "0.0.0.0"} | params
    return [
        RAY,
        "start",
        "--head",
        "--block",
        f"--node-ip-address={ip}",
        "--port=6379",
        "--dashboard-port=8265",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *(f"--{k}={v}" for k, v in params.items()),
    ]


def http_status(hosts, url: str, token: str | None) -> int:
    """The HTTP status of GET ``url`` from the client host, with or without the token."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    probe = (
        "import sys, urllib.request, urllib.error\n"
        f"request = urllib.request.Request({url!r}, headers={headers!r})\n"
        "try:\n    print(urllib.request.urlopen(request, timeout=10).status)\n"
        "except urllib.error.HTTPError as err:\n    print(err.code)\n"
        "except OSError as err:\n    print(0)\n"
    )
    done = subprocess.run(
        hosts.command("client", sys.executable, "-c", probe), capture_output=True, text=True, timeout=60
    )
    return int(done.stdout.strip() or 0)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_kuberay_heads_take_jobs_with_the_token_only(hosts, manifest):
    """N2: each KubeRay head takes jobs and Serve configs from another pod with the token, and refuses them without
    it."""
    document = yaml.safe_load((ROOT / "cluster" / "kuberay" / manifest).read_text())
    cluster = document["spec"].get("rayClusterSpec") or document["spec"].get("rayClusterConfig") or document["spec"]
    assert cluster["authOptions"]["mode"] == "token"  # KubeRay then gives every pod RAY_AUTH_MODE=token and the token
    env = os.environ | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": TOKEN,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    temp_dir = f"/tmp/pc-{os.getpid()}-kuberay"  # short: Ray's unix socket paths must fit in 107 characters
    head = subprocess.Popen(
        hosts.command("head", *head_command(cluster["headGroupSpec"]["rayStartParams"], hosts.ip["head"], temp_dir)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dashboard = f"http://{hosts.ip['head']}:8265"
    try:
        deadline = time.time() + 120
        while http_status(hosts, f"{dashboard}/api/version", TOKEN) != 200:
            assert time.time() < deadline and head.poll() is None, f"{dashboard} never answered the client pod"
            time.sleep(2)
        # The RayJob submitter's call: a job submitted from another pod, with the token.
        submit = [
            RAY,
            "job",
            "submit",
            "--address",
            dashboard,
            "--",
            "python",
            "-c",
            "print('submitted from another pod')",
        ]
        deadline = time.time() + 120
        while True:  # the dashboard answers before the head's job agent registers
            done = subprocess.run(
                hosts.command("client", *submit), env=env, capture_output=True, text=True, timeout=300
            )
            if "No available agent" not in done.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert done.returncode == 0 and "submitted from another pod" in done.stdout, (
            done.stdout[-2000:] + done.stderr[-2000:]
        )
        # The operator's call: the Serve REST API that a RayService's config is deployed through.
        assert http_status(hosts, f"{dashboard}/api/serve/applications/", TOKEN) == 200
        # Without the token, both are refused.
        assert http_status(hosts, f"{dashboard}/api/serve/applications/", None) in (401, 403)
        assert http_status(hosts, f"{dashboard}/api/jobs/", None) in (401, 403)
    finally:
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        hosts.stop_all("head")
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Multi-node, on separate addresses: a head and a worker node, one CPU each, on two test hosts, with S3 on a
# third, so that two workers or two replicas must land on different nodes and share storage only through the
# bucket. Driven through the CLIs from the head host, as a user on the cluster would.

S3_PORT = 9000


class NetCluster:
    def __init__(self, hosts, tag: str):
        self.hosts, self.tag, self.nodes = hosts, tag, 0
        self.env = os.environ | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": TOKEN,
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }
        # The hosts share this machine's hostname, which resolves to 127.0.0.1: name gloo's interface instead.
        self.env |= {"GLOO_SOCKET_IFNAME": "eth0"}
        self.env.pop("RAY_ADDRESS", None)
        self.address = f"{hosts.ip['head']}:6379"
        self.bucket = f"s3://polycolor/{tag}?endpoint_override={hosts.ip['client']}:{S3_PORT}&scheme=http"

    def start(self, host: str, *flags: str) -> subprocess.Popen:
        self.nodes += 1
        command = [
            RAY,
            "start",
            "--block",
            f"--node-ip-address={self.hosts.ip[host]}",
            "--num-cpus=1",
            "--disable-usage-stats",
            f"--temp-dir=/tmp/pc-{os.getpid()}-{self.nodes}",
            *flags,
        ]
        return subprocess.Popen(
            self.hosts.command(host, *command), env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def start_worker(self) -> subprocess.Popen:
        return self.start("worker", f"--address={self.address}")

    def on_head(self, *command: str) -> list[str]:
        return self.hosts.command("head", *command)

    def state(self, code: str) -> str:
        """What a Python snippet prints on the head host, with ``ray.util.state`` against the head's dashboard."""
        script = f"from ray.util.state import list_actors, list_nodes\naddress = 'http://{self.hosts.ip['head']}:8265'\n{code}"
        done = subprocess.run(
            self.on_head(sys.executable, "-c", script), env=self.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip()

    def alive_nodes(self) -> int:
        return int(self.state("print(sum(n.state == 'ALIVE' for n in list_nodes(address=address)))"))


@pytest.fixture(scope="module")
def net_cluster(hosts):

    cluster = NetCluster(hosts, "mn")
    s3 = subprocess.Popen(
        hosts.command("client", sys.executable, "-m", "moto.server", "-H", hosts.ip["client"], "-p", str(S3_PORT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cluster.start("head", "--head", "--port=6379", "--dashboard-host=0.0.0.0", "--dashboard-port=8265")
    cluster.start_worker()
    try:
        make_bucket = (
            "import pyarrow.fs, time\n"
            f"fs, _ = pyarrow.fs.FileSystem.from_uri({cluster.bucket!r} + '&allow_bucket_creation=true')\n"
            "for _ in range(100):\n    try:\n        fs.create_dir('polycolor'); break\n    except OSError: "
            "time.sleep(0.3)\n"
        )
        subprocess.run(cluster.on_head(sys.executable, "-c", make_bucket), env=cluster.env, check=True, timeout=120)
        deadline = time.time() + 180
        while True:
            try:
                if cluster.alive_nodes() == 2:
                    break
            except AssertionError:
                pass  # the dashboard is not up yet
            assert time.time() < deadline, "the two nodes never came up"
            time.sleep(2)
        yield cluster
    finally:
        for host in ("head", "worker", "client"):
            hosts.stop_all(host)
        s3.wait(timeout=30)
        for n in range(1, cluster.nodes + 1):
            shutil.rmtree(f"/tmp/pc-{os.getpid()}-{n}", ignore_errors=True)


def epochs_printed(text: str) -> list[int]:
    """The 1-based epochs rank 0 reported, in order, each once (worker lines can reach the driver twice)."""
    return list(dict.fromkeys(int(e) for e in re.findall(r"\[polycolor\] epoch (\d+)/8", text)))


def train_command(cluster: NetCluster, name: str, *flags: str) -> list[str]:
    return cluster.on_head(
        sys.executable,
        "-m",
        "polycolor.train",
        "--smoke-test",
        "--workers",
        "2",
        "--threads",
        "1",
        "--storage",
        cluster.bucket,
        "--name",
        name,
        *flags,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_hosts_train_with_storage_in_a_bucket(net_cluster):
    """Two workers on two hosts train with their storage in a bucket."""
    env = net_cluster.env | {"RAY_ADDRESS": net_cluster.address}
    done = subprocess.run(
        train_command(net_cluster, "spread"), env=env, cwd=ROOT, capture_output=True, text=True, timeout=500
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    nodes = net_cluster.state(
        "print(len({a.node_id for a in list_actors(address=address, filters=[('class_name', '=', 'RayTrainWorker')])}))"
    )
    assert nodes == "2"  # one worker per node
    assert f"-> {storage.join(net_cluster.bucket, 'spread', 'best')}" in done.stdout  # best/ went to the bucket


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_serve_replicas_on_two_hosts_answer_another_host(net_cluster, tmp_path):
    from PIL import Image

    from polycolor import checkpoint, synth

    from conftest import tiny_model

    path = checkpoint.write(tmp_path / "ckpt", tiny_model(), REAL_PALETTE)
    head = net_cluster.hosts.ip["head"]
    command = net_cluster.on_head(
        sys.executable,
        "-m",
        "polycolor.serve",
        "--checkpoint",
        str(path),
        "--replicas",
        "2",
        "--host",
        head,
        "--port",
        "8000",
    )
    env = net_cluster.env | {"RAY_ADDRESS": net_cluster.address}
    server = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:  # "[serve] http://..." once both replicas are up
            if line.startswith("[serve] http"):
                break
        nodes = net_cluster.state(
            "print(len({a.node_id for a in list_actors(address=address, filters=[('class_name', '=', "
            "'ServeReplica:polycolor:Model'), ('state', '=', 'ALIVE')])}))"
        )
        assert nodes == "2"
        buffer = io.BytesIO()
        Image.fromarray(np.where(synth.generate(1, seed=5).outlines[0], 0, 255).astype(np.uint8)).save(
            buffer, format="PNG"
        )
        (tmp_path / "o.png").write_bytes(buffer.getvalue())
        client = (
            "import httpx\n"
            f"image = open({str(tmp_path / 'o.png')!r}, 'rb').read()\n"
            f"answers = [httpx.post('http://{head}:8000/colorize', files={{'image': ('o.png', image)}}, "
            f"data={{'color': 'teal'}}, timeout=60) for _ in range(12)]\n"
            "print(sum(a.status_code == 200 and a.headers['content-type'] == 'image/png' for a in answers))\n"
        )
        done = subprocess.run(
            net_cluster.hosts.command("client", sys.executable, "-c", client),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.stdout.strip() == "12", done.stderr[-2000:]
    finally:
        server.send_signal(signal.SIGINT)  # a clean Serve shutdown frees both nodes' CPUs for the next test
        server.wait(timeout=120)
    assert server.returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_lost_worker_host_resumes_on_a_new_node(net_cluster):
    """A worker host lost mid-run: the run resumes from the bucket on a new node."""
    env = net_cluster.env | {"RAY_ADDRESS": net_cluster.address}
    command = train_command(net_cluster, "moved", "--epochs", "8", "--train-pairs", "256", "--max-failures", "3")
    run = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, removed = [], False
    for line in run.stdout:  # worker lines arrive prefixed "(RayTrainWorker pid=...)"
        lines.append(line)
        if "[polycolor] epoch 2/8" in line and not removed:  # two epochs reported: the worker host loses every process
            net_cluster.hosts.stop_all("worker")
            net_cluster.start_worker()  # a replacement node joins; the run needs both CPUs again
            removed = True
    output = "".join(lines)
    assert run.wait(timeout=60) == 0, output[-4000:]
    before, _, after = output.rpartition("resuming moved at epoch ")
    assert before, "the run never restarted from a checkpoint:\n" + output[-3000:]
    resumes = [int(e) for e in re.findall(r"resuming moved at epoch (\d+)", output)]  # 0-based next epoch
    start = resumes[-1]
    assert min(resumes) >= 1, f"a restart began from scratch: {resumes}"  # every restart continued from a checkpoint
    assert epochs_printed(before)[:start] == list(range(1, start + 1))  # what the last restart resumed had been done
    assert epochs_printed(after) == list(
        range(start + 1, 9)
    )  # and after it, each remaining epoch, in order, to the end
