"""infra/: the cluster configs are valid, agree with requirements.txt, dvc.yaml and each other; mlflow-server.sh.

Nothing here starts Ray, a container or a server: the YAML is checked as data, with Ray's own cluster-config and
runtime-env validation called offline, and mlflow-server.sh runs against a stub `mlflow` that prints its arguments.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
RAY_IMAGE = re.compile(r"^rayproject/ray(?:-ml)?:(?P<version>\d+\.\d+\.\d+)(?:-|$)")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", "<"}


# ---------------------------------------------------------------- reading


def pins() -> dict[str, str]:
    """requirements.txt as {canonical name: '==version'}."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs}


def runtime_dependencies() -> set[str]:
    """pyproject.toml's [project] dependencies (what the code imports; the test-only pins are not among them)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(Requirement(dep).name) for dep in project["dependencies"]}


def pinned_version(name: str) -> str:
    return pins()[name].removeprefix("==")


def documents() -> dict[Path, list[dict]]:
    """Every YAML document under infra/, by file."""
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    return {path: [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None] for path in files}


def of_kind(kind: str) -> list[dict]:
    return [doc for docs in documents().values() for doc in docs if doc.get("kind") == kind]


def only(kind: str) -> dict:
    found = of_kind(kind)
    assert len(found) == 1, f"expected one {kind} under infra/, found {len(found)}"
    return found[0]


def launcher_config() -> dict:
    return yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())


def cluster_specs() -> dict[str, dict]:
    """The Ray cluster specs: each RayCluster's spec and each RayJob's rayClusterSpec."""
    specs = {f"RayCluster {doc['metadata']['name']}": doc["spec"] for doc in of_kind("RayCluster")}
    specs |= {f"RayJob {doc['metadata']['name']}": doc["spec"]["rayClusterSpec"] for doc in of_kind("RayJob")}
    return specs


def pod_specs(cluster_spec: dict) -> list[dict]:
    """The head's and every worker group's pod spec."""
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def job_runtime_env() -> dict:
    return yaml.safe_load(only("RayJob")["spec"]["runtimeEnvYAML"])


def entrypoint() -> list[str]:
    return shlex.split(only("RayJob")["spec"]["entrypoint"])


def project_dir() -> str:
    """Where the RayJob runs the pipeline: the directory of `dvc --cd <dir>`."""
    args = entrypoint()
    assert args[:2] == ["dvc", "--cd"], f"the entrypoint should be `dvc --cd <project> repro ...`, got {args}"
    return args[2]


def dvc_targets() -> set[str]:
    """Every name `dvc repro` accepts: plain stages, and name@item for each item of a foreach stage."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    names = set()
    for name, stage in stages.items():
        items = stage.get("foreach")
        if isinstance(items, str):  # ${models}: a params key
            items = params[items.strip("${}")]
        names |= {f"{name}@{item}" for item in items} if items is not None else {name}
    return names


# ---------------------------------------------------------------- every file


def test_every_yaml_under_infra_parses_into_mappings():
    docs = documents()
    assert {p.relative_to(INFRA).as_posix() for p in docs} >= {
        "ray-cluster.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/runtime-env.yaml",
    }
    for path, found in docs.items():
        assert found and all(isinstance(doc, dict) for doc in found), path
        for doc in found:
            if "kind" in doc:  # a Kubernetes object
                assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']}"


def test_every_ray_image_is_the_ray_version_pinned_in_requirements():
    images = [launcher_config()["docker"]["image"]]
    images += [c["image"] for spec in cluster_specs().values() for pod in pod_specs(spec) for c in pod["containers"]]
    versions = {image: RAY_IMAGE.match(image) for image in images}
    assert all(versions.values()), f"not a rayproject/ray:<version>-... image: {versions}"
    assert {m["version"] for m in versions.values()} == {pinned_version("ray")}
    for name, spec in cluster_specs().items():
        assert spec["rayVersion"] == pinned_version("ray"), name


def test_the_mlflow_server_image_is_the_pinned_mlflow_version():
    deployment = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].rsplit(":", 1)[1].removeprefix("v") == pinned_version("mlflow")


# ---------------------------------------------------------------- Ray cluster launcher


def test_the_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher_config()
    assert config["cluster_name"] and config["max_workers"] >= 1
    types = config["available_node_types"]
    assert config["head_node_type"] in types and len(types) >= 2  # a head and at least one worker type
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert all(0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers)
    validate_config(prepare_config(config))  # the schema `ray up` checks, filled with the provider's defaults


def test_the_cluster_launcher_installs_the_mounted_repos_pinned_requirements_and_the_package():
    config = launcher_config()
    mounted = [remote for remote, local in config["file_mounts"].items() if (ROOT / local).resolve() == ROOT]
    assert len(mounted) == 1, f"file_mounts should copy the repo root once, got {config['file_mounts']}"
    setup = [shlex.split(cmd) for cmd in config["setup_commands"]]
    installs = [cmd for cmd in setup if cmd[:2] == ["pip", "install"]]
    assert any(f"{mounted[0]}/requirements.txt" in cmd and "-r" in cmd for cmd in installs)
    assert any(cmd[-1] == mounted[0] for cmd in installs)  # the package itself
    assert ".gitignore" in config.get("rsync_filter", [])  # no .venv, data or mlflow.db shipped to the nodes


# ---------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("name", sorted(cluster_specs()))
def test_each_ray_cluster_has_a_head_and_bounded_worker_groups_with_resources(name):
    spec = cluster_specs()[name]
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # the job API is never exposed by this config
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for pod in pod_specs(spec):
        for container in pod["containers"]:
            assert container["image"] and container["resources"]["limits"]["cpu"], f"{name}: {container['name']}"


@pytest.mark.parametrize("name", sorted(cluster_specs()))
def test_a_reclaimed_worker_pod_drains_its_ray_node_within_its_grace_period(name):
    """KubeRay's worker pods tell Ray they are going (a preemption drain with a deadline, which Ray Train passes to
    the train stage as a preemption notice) and stay up until that deadline, inside the pod's grace period."""
    from ray.scripts.scripts import drain_node

    for group in cluster_specs()[name]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        shell = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert shell[:2] == ["/bin/sh", "-c"]
        drain, _, wait = shell[2].partition(" && ")
        env, *args = shlex.split(drain)
        assert env == "RAY_ADDRESS=$FQ_RAY_IP:6379" and args[:2] == ["ray", "drain-node"]  # this pod's node
        options = drain_node.make_context("drain-node", args[2:]).params  # Ray's own parser: a typo fails here
        assert options["reason"] == "DRAIN_NODE_REASON_PREEMPTION"
        # the node goes before the deadline (Ray Train restarts the group then: without that node, not retrying it)
        assert int(wait.split()[-1]) < options["deadline_remaining_seconds"] < pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("name", sorted(cluster_specs()))
def test_every_ray_pod_mounts_a_declared_shared_claim_above_the_project(name):
    claims = {doc["metadata"]["name"] for doc in of_kind("PersistentVolumeClaim")}
    for pod in pod_specs(cluster_specs()[name]):
        volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        mounts = [
            m
            for c in pod["containers"]
            for m in c["volumeMounts"]
            if project_dir().startswith(m["mountPath"].rstrip("/") + "/")
        ]
        assert mounts, f"{name}: no volume mounted above {project_dir()}"
        assert all(volumes[m["name"]] in claims for m in mounts), f"{name}: {volumes} not in {claims}"
    rwx = [doc for doc in of_kind("PersistentVolumeClaim") if "ReadWriteMany" in doc["spec"]["accessModes"]]
    assert rwx, "the shared claim must be ReadWriteMany: pods on several nodes mount it"


def test_the_rayjob_runs_a_dvc_stage_of_this_repo_and_deletes_its_cluster():
    spec = only("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["rayClusterSpec"]
    args = entrypoint()
    assert not SHELL_OPERATORS & set(args), "KubeRay pastes the entrypoint unquoted into the submitter's shell"
    targets = args[args.index("repro") + 1 :]
    assert targets and set(targets) <= dvc_targets(), f"{targets} are not stages of dvc.yaml"
    scripts = [a for a in args if a.endswith(".py")]
    assert all((ROOT / s).is_file() for s in scripts)


def test_the_job_runtime_env_is_valid_for_ray_and_matches_the_pins():
    from ray.runtime_env import RuntimeEnv

    env = job_runtime_env()
    RuntimeEnv(**env)  # Ray's own parsing: unknown keys and malformed pip options raise
    listed = {canonicalize_name(r.name): str(r.specifier) for r in map(Requirement, env["pip"]["packages"])}
    assert set(listed) == runtime_dependencies() - {"ray"}  # Ray comes from the image, whose tag is the pin
    assert all(listed[name] == pins()[name] for name in listed)


def test_the_job_runtime_env_gives_every_process_the_shared_code_and_the_mlflow_service():
    env_vars = job_runtime_env()["env_vars"]
    assert env_vars["PYTHONPATH"] == f"{project_dir()}/src"
    assert (ROOT / "src" / "latentzoo").is_dir()
    service = next(s for s in of_kind("Service") if s["metadata"]["name"] == "mlflow")
    port = service["spec"]["ports"][0]["port"]
    assert env_vars["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}:{port}"
    assert "working_dir" not in job_runtime_env()  # per-node copies would split the project the stages share


def test_the_job_runtime_env_sets_no_variable_the_stages_set_in_theirs():
    """Ray refuses to merge a job's env_vars with a driver's ray.init(runtime_env=...) that sets the same name."""
    source = (ROOT / "src" / "latentzoo" / "training" / "cluster.py").read_text()
    strings = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" in strings  # what connect_ray sets; the check below is live
    assert not set(job_runtime_env()["env_vars"]) & strings


def test_the_runtime_env_file_for_ray_job_submit_is_the_rayjobs():
    assert yaml.safe_load((KUBERAY / "runtime-env.yaml").read_text()) == job_runtime_env()


def test_every_repro_target_in_the_cluster_docs_is_a_stage():
    docs = (ROOT / "README.md").read_text() + (INFRA / "README.md").read_text()
    targets = set(re.findall(r"\brepro ([\w@-]+)", docs))
    assert targets and targets <= dvc_targets()


# ---------------------------------------------------------------- mlflow-server.sh


def test_the_mlflow_server_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(INFRA / "mlflow-server.sh")], check=True)


def run_server_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run a copy of mlflow-server.sh whose repo .venv holds a stub mlflow that prints its arguments."""
    (tmp_path / "infra").mkdir()
    shutil.copy(INFRA / "mlflow-server.sh", tmp_path / "infra")
    stub = tmp_path / ".venv" / "bin" / "mlflow"
    stub.parent.mkdir(parents=True)
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in {"HOST", "PORT", "APP_NAME", "ALLOWED_HOSTS"}}
    return subprocess.run(
        ["bash", str(tmp_path / "infra" / "mlflow-server.sh")],
        env=clean | env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_the_mlflow_server_defaults_to_loopback_sqlite_and_served_artifacts(tmp_path):
    done = run_server_script(tmp_path)
    args = done.stdout.splitlines()
    assert args[0] == "server" and option(args, "--host") == "127.0.0.1"
    assert option(args, "--backend-store-uri") == "sqlite:///mlflow.db"
    assert "--serve-artifacts" in args and "--artifacts-destination" in args
    assert "--app-name" not in args and "WARNING" not in done.stderr


def test_the_mlflow_server_warns_when_bound_beyond_loopback_without_auth(tmp_path):
    done = run_server_script(
        tmp_path,
        HOST="0.0.0.0",
        BACKEND_STORE_URI="postgresql://u:p@db/mlflow",
        ARTIFACTS_DESTINATION="s3://bucket/mlflow",
    )
    args = done.stdout.splitlines()
    assert option(args, "--host") == "0.0.0.0" and "WARNING" in done.stderr
    assert option(args, "--backend-store-uri") == "postgresql://u:p@db/mlflow"
    assert option(args, "--artifacts-destination") == "s3://bucket/mlflow"


def test_the_mlflow_server_takes_basic_auth_and_allowed_hosts(tmp_path):
    done = run_server_script(tmp_path, HOST="0.0.0.0", APP_NAME="basic-auth", ALLOWED_HOSTS="mlflow.example.org")
    args = done.stdout.splitlines()
    assert option(args, "--app-name") == "basic-auth" and option(args, "--allowed-hosts") == "mlflow.example.org"
    assert "WARNING" not in done.stderr


# ---------------------------------------------------------------- nobody else in (Ray token, MLflow auth, network)

PART_OF = {"app.kubernetes.io/part-of": "latentzoo"}


def pod_templates(cluster_spec: dict) -> list[dict]:
    return [group["template"] for group in [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]]


def secret_env(container: dict) -> dict[str, tuple[str, str]]:
    """{env var: (secret, key)} of a container's variables taken from Secrets."""
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


@pytest.mark.parametrize("name", sorted(cluster_specs()))
def test_every_ray_cluster_requires_the_token_and_logs_in_to_mlflow(name):
    spec = cluster_specs()[name]
    assert spec["authOptions"] == {"mode": "token"}  # KubeRay sets RAY_AUTH_MODE / RAY_AUTH_TOKEN from its Secret
    assert tuple(int(p) for p in spec["rayVersion"].split(".")) >= (2, 52)  # Ray's token auth
    mlflow = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow")
    server_env = secret_env(mlflow["spec"]["template"]["spec"]["containers"][0])
    for template in pod_templates(spec):
        assert template["metadata"]["labels"].items() >= PART_OF.items()  # admitted by the network policy
        for container in template["spec"]["containers"]:
            env = secret_env(container)
            assert env["MLFLOW_TRACKING_USERNAME"] == server_env["MLFLOW_AUTH_ADMIN_USERNAME"]
            assert env["MLFLOW_TRACKING_PASSWORD"] == server_env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    if name.startswith("RayJob"):  # its submitter is a container of the head pod, so the policy admits it too
        assert only("RayJob")["spec"]["submissionMode"] == "SidecarMode"


def test_mlflow_runs_its_basic_auth_app_with_users_on_its_volume():
    mlflow = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow")
    pod = mlflow["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert "--app-name=basic-auth" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert set(secret_env(container)) == {
        "MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    }
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    mount = next(m for m in container["volumeMounts"] if config_path.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = next(c for c in of_kind("ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"])
    import configparser

    ini = configparser.ConfigParser()
    ini.read_string(config_map["data"][config_path.name])
    store = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "store")
    assert ini["mlflow"]["database_uri"] == f"sqlite:///{store}/basic_auth.db"  # kept with the runs, not the pod
    assert "admin_password" not in ini["mlflow"]  # from the Secret only
    assert pod["metadata"]["labels"].items() >= PART_OF.items()
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"  # the one route the auth app leaves open


def test_only_the_projects_pods_reach_ray_and_mlflow():
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind("NetworkPolicy")}
    ray, mlflow = policies["latentzoo-ray"], policies["latentzoo-mlflow"]
    for policy in (ray, mlflow):
        assert policy["policyTypes"] == ["Ingress"]
        for rule in policy["ingress"]:
            for peer in rule["from"]:  # no rule admits everyone: each names pods by label
                assert peer["podSelector"]["matchLabels"]
    assert ray["podSelector"]["matchLabels"].items() >= PART_OF.items()
    project_rule, operator_rule = ray["ingress"]
    assert project_rule["from"] == [{"podSelector": {"matchLabels": PART_OF}}]
    assert operator_rule["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    assert [p["port"] for p in operator_rule["ports"]] == [8265]  # the operator polls the job API, nothing else
    deployment = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow")
    assert mlflow["podSelector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (rule,) = mlflow["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": PART_OF}}] and [p["port"] for p in rule["ports"]] == [5000]
