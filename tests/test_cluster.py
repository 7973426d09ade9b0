"""cluster/: every config validates against the schema its tool uses, and names things that exist."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
MANIFESTS = {"raycluster.yaml": "ray.io_rayclusters.yaml", "rayjob.yaml": "ray.io_rayjobs.yaml", "rayservice.yaml": "ray.io_rayservices.yaml"}


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs_pass_ray_up_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    head = config["head_start_ray_commands"][-1]
    assert "--dashboard-host=127.0.0.1" in head  # never opened to the internet
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])


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
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


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
