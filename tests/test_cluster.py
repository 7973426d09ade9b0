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

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
MANIFESTS = {"raycluster.yaml": "ray.io_rayclusters.yaml", "rayjob.yaml": "ray.io_rayjobs.yaml", "rayservice.yaml": "ray.io_rayservices.yaml"}


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs_pass_ray_up_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    head, worker = config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]
    assert "--dashboard-host=127.0.0.1" in head  # never opened to the internet: `ray dashboard` forwards it
    assert head.startswith("RAY_AUTH_MODE=token ") and worker.startswith("RAY_AUTH_MODE=token ")  # token auth, said explicitly
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token on every node
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])
    from tune.search import DRIVER_RESOURCE

    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"][DRIVER_RESOURCE] >= 1  # Tune's trial drivers live on the head
    assert all(DRIVER_RESOURCE not in n["resources"] for k, n in nodes.items() if k != config["head_node_type"])


def test_trial_drivers_ask_for_the_head_resource_only_where_the_cluster_has_it():
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
        if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
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
    for config in (yaml.safe_load(service["spec"]["serveConfigV2"]), yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())):
        schema = ServeDeploySchema.model_validate(config)
        for application in schema.applications:
            module, attribute = application.import_path.split(":")
            assert callable(getattr(__import__(module, fromlist=[attribute]), attribute))
            from polycolor.serve import ServeConfig

            ServeConfig.from_args({k: v for k, v in application.args.items()})  # every arg is known
    assert yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())["http_options"]["host"] == "127.0.0.1"


def test_named_commands_answer_help():
    job = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert job["spec"]["entrypoint"].startswith("python -m tune.search")
    for module in ("tune.search", "polycolor.train", "polycolor.serve", "polycolor.predict", "polycolor.evaluate", "polycolor.data"):
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0 and "usage" in done.stdout, module
    flags = subprocess.run([sys.executable, "-m", "tune.search", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
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
    return ["ray", "start", "--head", "--block", f"--node-ip-address={ip}", "--port=6379", "--dashboard-port=8265",
            f"--temp-dir={temp_dir}", "--disable-usage-stats", *(f"--{k}={v}" for k, v in params.items())]  # fmt: skip


def http_status(hosts, url: str, token: str | None) -> int:
    """The HTTP status of GET ``url`` from the client host, with or without the token."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    probe = ("import sys, urllib.request, urllib.error\n"
             f"request = urllib.request.Request({url!r}, headers={headers!r})\n"
             "try:\n    print(urllib.request.urlopen(request, timeout=10).status)\n"
             "except urllib.error.HTTPError as err:\n    print(err.code)\n"
             "except OSError as err:\n    print(0)\n")  # fmt: skip
    done = subprocess.run(hosts.command("client", sys.executable, "-c", probe), capture_output=True, text=True, timeout=60)
    return int(done.stdout.strip() or 0)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_each_kuberay_head_takes_jobs_and_serve_configs_from_another_pod_with_the_token_only(hosts, manifest):
    document = yaml.safe_load((ROOT / "cluster" / "kuberay" / manifest).read_text())
    cluster = document["spec"].get("rayClusterSpec") or document["spec"].get("rayClusterConfig") or document["spec"]
    assert cluster["authOptions"]["mode"] == "token"  # KubeRay then gives every pod RAY_AUTH_MODE=token and the token
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = f"/tmp/pc-{os.getpid()}-kuberay"  # short: Ray's unix socket paths must fit in 107 characters
    head = subprocess.Popen(hosts.command("head", *head_command(cluster["headGroupSpec"]["rayStartParams"], hosts.ip["head"], temp_dir)),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    dashboard = f"http://{hosts.ip['head']}:8265"
    try:
        deadline = time.time() + 120
        while http_status(hosts, f"{dashboard}/api/version", TOKEN) != 200:
            assert time.time() < deadline and head.poll() is None, f"{dashboard} never answered the client pod"
            time.sleep(2)
        # The RayJob submitter's call: a job submitted from another pod, with the token.
        submit = ["ray", "job", "submit", "--address", dashboard, "--", "python", "-c", "print('submitted from another pod')"]
        deadline = time.time() + 120
        while True:  # the dashboard answers before the head's job agent registers
            done = subprocess.run(hosts.command("client", *submit), env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in done.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert done.returncode == 0 and "submitted from another pod" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
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
# A local multi-node proof: a head and a worker node on this machine, one CPU each, so that two
# workers or two replicas must land on different nodes. Driven through the CLIs, as a user would.


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    dashboard = free_port()
    head_args = {"num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield {"cluster": cluster, "worker": worker, "dashboard": f"http://127.0.0.1:{dashboard}",
           "env": os.environ | {"RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"}}  # fmt: skip
    cluster.shutdown()


def actor_nodes(dashboard: str, class_name: str, state: str | None = None) -> list[str]:
    """The node ids of the actors of ``class_name`` (the state API keeps finished ones too)."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name)] + ([("state", "=", state)] if state else [])
    return [a.node_id for a in list_actors(address=dashboard, filters=filters, limit=1000, raise_on_missing_output=False)]


def epochs_printed(text: str) -> list[int]:
    """The 1-based epochs rank 0 reported, in order, each once (worker lines can reach the driver twice)."""
    return list(dict.fromkeys(int(e) for e in re.findall(r"\[polycolor\] epoch (\d+)/8", text)))


def train_command(storage: Path, name: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "polycolor.train", "--smoke-test", "--workers", "2", "--threads", "1",
            "--storage", str(storage), "--name", name, *flags]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_on_two_nodes_train_to_a_shared_storage_path(two_nodes, tmp_path):
    done = subprocess.run(train_command(tmp_path, "spread"), env=two_nodes["env"], cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert len(set(actor_nodes(two_nodes["dashboard"], "RayTrainWorker"))) == 2  # one worker per node
    assert (tmp_path / "spread" / "best" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_serve_replicas_on_two_nodes_answer(two_nodes, tmp_path):
    import httpx
    from PIL import Image

    from conftest import tiny_model
    from polycolor import checkpoint, synth

    path = checkpoint.write(tmp_path / "ckpt", tiny_model(), synth.REAL_PALETTE)
    port = free_port()
    command = [sys.executable, "-m", "polycolor.serve", "--checkpoint", str(path), "--replicas", "2", "--port", str(port)]
    server = subprocess.Popen(command, env=two_nodes["env"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:  # "[serve] http://..." once both replicas are up
            if line.startswith("[serve] http"):
                break
        nodes = actor_nodes(two_nodes["dashboard"], "ServeReplica:polycolor:Colorizer", state="ALIVE")
        assert len(nodes) == 2 and len(set(nodes)) == 2
        buffer = io.BytesIO()
        Image.fromarray(np.where(synth.generate(1, seed=5).outlines[0], 0, 255).astype(np.uint8)).save(buffer, format="PNG")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            answers = [client.post("/colorize", files={"image": ("o.png", buffer.getvalue())}, data={"color": "teal"}) for _ in range(12)]
        assert all(a.status_code == 200 and a.headers["content-type"] == "image/png" for a in answers)
    finally:
        server.send_signal(signal.SIGINT)  # a clean Serve shutdown frees both nodes' CPUs for the next test
        server.wait(timeout=120)
    assert server.returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_worker_node_removed_mid_training_run_resumes_on_a_new_node(two_nodes, tmp_path):
    cluster = two_nodes["cluster"]
    command = train_command(tmp_path, "moved", "--epochs", "8", "--train-pairs", "256", "--max-failures", "3")
    run = subprocess.Popen(command, env=two_nodes["env"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, removed = [], False
    for line in run.stdout:  # worker lines arrive prefixed "(RayTrainWorker pid=...)"
        lines.append(line)
        if "[polycolor] epoch 2/8" in line and not removed:  # two epochs reported: pull the worker node, once
            cluster.remove_node(two_nodes["worker"], allow_graceful=False)
            two_nodes["worker"] = cluster.add_node(num_cpus=1)  # a replacement joins; the run needs both CPUs again
            removed = True
    output = "".join(lines)
    assert run.wait(timeout=60) == 0, output[-4000:]
    before, _, after = output.rpartition("resuming moved at epoch ")
    assert before, "the run never restarted from a checkpoint:\n" + output[-3000:]
    resumes = [int(e) for e in re.findall(r"resuming moved at epoch (\d+)", output)]  # 0-based next epoch
    start = resumes[-1]
    assert min(resumes) >= 1, f"a restart began from scratch: {resumes}"  # every restart continued from a checkpoint
    assert epochs_printed(before)[:start] == list(range(1, start + 1))  # what the last restart resumed had been done
    assert epochs_printed(after) == list(range(start + 1, 9))  # and after it, each remaining epoch, in order, to the end
