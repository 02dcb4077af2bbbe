"""cluster/: the `ray up` files pass Ray's own cluster-launcher checks; the KubeRay RayJob is pinned and safe.

`ray up FILE` runs these steps before it touches a machine (ray.autoscaler._private.commands._bootstrap_config):
  1. `prepare_config`: merge with the provider's defaults.yaml, fill node-type min/max workers, check Docker
     settings; for provider `local` also the head/worker IP bookkeeping (`prepare_local`);
  2. the provider's `fillout_available_node_types_resources` (auto-detected CPUs and GPUs);
  3. `validate_config`: Ray's ray-schema.json (with jsonschema, a Ray dependency) plus cross-field checks;
  4. the provider's `bootstrap_config`.
For onprem.yaml (provider `local`) all four run here, through `_bootstrap_config` itself: steps 2 and 4 are offline
for that provider. For AWS and GCP, steps 2 and 4 call the cloud (EC2 DescribeInstanceTypes, IAM roles, key pairs,
subnets and security groups; GCP IAM and Compute through googleapiclient, which is not installed) and need
credentials and network, so only steps 1 and 3 run: a wrong AMI, instance type, zone or project id is caught by a
real `ray up` only. Project checks come on top: no credentials in any file, the dashboard bound to localhost, a CPU
head and autoscaled 8-GPU workers that fit one trial of sweeps/paper.yaml, msad and Ray installed at pinned
versions, and the README's `ray` commands using only flags the installed Ray has.
"""

from __future__ import annotations

import copy
import importlib.metadata
import ipaddress
import json
import re
import shlex
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.resource_demand_scheduler import get_bin_pack_residual
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.scripts.scripts import cli as ray_cli

from msad.sweep.spec import Sweep, load_sweep

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay-rayjob.yaml"
RAY_UP_FILES = sorted(p.name for p in CLUSTER.glob("*.yaml") if p != KUBERAY)
CLOUD_FILES = [name for name in RAY_UP_FILES if name != "onprem.yaml"]
SHARED_MOUNT = Path("/shared")  # where every cluster file mounts the shared file system
DOCUMENTATION_NETS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]

# A value must follow the key on the same line, and may not be a reference ($VAR, ${...}, <placeholder>, {...}).
_VALUE = r"""[ \t]*\\?["']?[ \t]*[:=][ \t]*\\?["']?(?![$<{\\])"""
CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key block": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "secret-like key with a value": re.compile(
        r"(?i)[\w-]*(?:secret|password|passwd|api[-_]?key|access[-_]?key|token)[\w-]*" + _VALUE + r"[^\s'\"]{6,}"),
    "WANDB_API_KEY with a value": re.compile(r"WANDB_API_KEY" + _VALUE + r"\w"),
    "40-hex-digit token (a W&B key's form)": re.compile(r"\b[0-9a-f]{40}\b"),
}


def credential_findings(text: str) -> list[str]:
    """Names of the credential patterns found in `text` (empty when it is clean)."""
    return [name for name, pattern in CREDENTIAL_PATTERNS.items() if pattern.search(text)]


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def ray_schema() -> dict[str, Any]:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def ray_up_offline(raw: dict[str, Any]) -> dict[str, Any]:
    """The config `ray up` goes on with after its offline steps (see the module docstring)."""
    config = copy.deepcopy(raw)
    if config["provider"]["type"] == "local":
        return _bootstrap_config(config, no_config_cache=True)
    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def prepared() -> dict[str, dict[str, Any]]:
    return {name: ray_up_offline(load(CLUSTER / name)) for name in RAY_UP_FILES}


@pytest.fixture(scope="module")
def paper() -> Sweep:
    return load_sweep(REPO / "sweeps" / "paper.yaml", ["model.pretrained=/shared/weights/s_resnet50.pt"])


def trial_bundles(sweep: Sweep) -> list[list[dict[str, float]]]:
    """Each trial's Ray Train worker bundles, as its placement group asks for them."""
    bundles = []
    for trial in sweep.teachers + sweep.students:
        d = trial.config["distributed"]
        assert d["use_gpu"], f"{trial.name}: the paper's trials train on GPUs"
        bundles.append([{"CPU": d["cpus_per_worker"], "GPU": d["gpus_per_worker"]}] * d["num_workers"])
    return bundles


def gpu_node_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in config["available_node_types"].items()
            if name != config["head_node_type"] and t["resources"].get("GPU", 0) > 0}


# ---------------------------------------------------------------------------------------------------------------------
# ray up files: Ray's own checks
# ---------------------------------------------------------------------------------------------------------------------


def test_cluster_folder_has_the_documented_files() -> None:
    assert {"aws.yaml", "gcp.yaml", "onprem.yaml"} <= set(RAY_UP_FILES)
    assert KUBERAY.is_file() and (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_file_as_written_matches_ray_schema(name: str) -> None:
    jsonschema.validate(load(CLUSTER / name), ray_schema())


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_file_passes_ray_up_offline_steps(name: str, prepared: dict[str, dict[str, Any]]) -> None:
    config = prepared[name]
    assert config["head_node_type"] in config["available_node_types"]
    for node_type in config["available_node_types"].values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]


def test_ray_checks_are_not_vacuous() -> None:
    """The same checks reject what Ray's schema forbids: fractional resources and unknown top-level keys."""
    raw = load(CLUSTER / "aws.yaml")
    fractional = copy.deepcopy(raw)
    fractional["available_node_types"]["gpu_8x_a100"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        ray_up_offline(fractional)
    unknown = {**copy.deepcopy(raw), "worker_start_commands": []}
    with pytest.raises(jsonschema.ValidationError):
        ray_up_offline(unknown)


def test_onprem_keeps_every_listed_machine_and_uses_documentation_addresses(
        prepared: dict[str, dict[str, Any]]) -> None:
    config = prepared["onprem.yaml"]
    provider = config["provider"]
    (node_type,) = config["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(provider["worker_ips"]) > 0
    for address in [provider["head_ip"], *provider["worker_ips"]]:
        assert any(ipaddress.ip_address(address) in net for net in DOCUMENTATION_NETS), address


# ---------------------------------------------------------------------------------------------------------------------
# ray up files: project rules
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_dashboard_is_bound_to_localhost(name: str, prepared: dict[str, dict[str, Any]]) -> None:
    head = " ".join(prepared[name]["head_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(prepared[name]["worker_start_ray_commands"])


@pytest.mark.parametrize("name", CLOUD_FILES)
def test_cpu_head_and_autoscaled_eight_gpu_workers(name: str, prepared: dict[str, dict[str, Any]]) -> None:
    config = prepared[name]
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0
    assert gpu_node_types(config), "no worker type with GPUs"
    for node_type in gpu_node_types(config).values():
        assert node_type["resources"]["GPU"] == 8
        assert node_type["min_workers"] == 0 < node_type["max_workers"]
        node_config = node_type["node_config"]
        if config["provider"]["type"] == "gcp":  # GPUs the VM gets must be the GPUs the autoscaler plans with
            assert sum(a["acceleratorCount"] for a in node_config["guestAccelerators"]) == 8
            assert node_config["scheduling"]["onHostMaintenance"] == "TERMINATE"


def test_gpu_images_have_a_driver_for_the_pinned_torch() -> None:
    """torch's PyPI wheel is built for one CUDA (13.0 for 2.14.1): every cluster file must name a driver that runs
    it. GCP's Deep Learning VM family ends in its driver branch; the other files state the minimum for the user's
    image or nodes (the AMI id and the Kubernetes nodes are the user's to choose)."""
    import torch

    from msad.engine.gpu import MIN_DRIVER_FOR_CUDA_MAJOR

    needed = int(MIN_DRIVER_FOR_CUDA_MAJOR[int(torch.version.cuda.split(".")[0])].split(".")[0])
    gcp = yaml.safe_load((CLUSTER / "gcp.yaml").read_text())
    images = [disk["initializeParams"]["sourceImage"] for node in gcp["available_node_types"].values()
              for disk in node["node_config"]["disks"]]
    assert images and all(int(re.search(r"-nvidia-(\d+)$", image).group(1)) >= needed for image in images)
    for name in ("aws.yaml", "onprem.yaml", "kuberay-rayjob.yaml", "README.md"):
        text = (CLUSTER / name).read_text().replace("\n", " ")
        assert re.search(rf"(>=|or newer).{{0,40}}{needed}|{needed}.{{0,20}}or newer", text), \
            f"{name} does not state the NVIDIA driver >= {needed} that the pinned torch needs"


@pytest.mark.parametrize("name", CLOUD_FILES)
def test_a_paper_trial_fits_one_gpu_node_and_none_fits_the_head(name: str, prepared: dict[str, dict[str, Any]],
                                                                 paper: Sweep) -> None:
    """Ray's own bin packing: every trial's workers fit one GPU node (no cross-node NCCL); the head takes none."""
    config = prepared[name]
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    for node_type in gpu_node_types(config).values():
        assert node_type["max_workers"] >= paper.spec.max_concurrent_trials
        for bundles in trial_bundles(paper):
            unplaced, _ = get_bin_pack_residual([node_type["resources"]], bundles)
            assert unplaced == []
            unplaced, _ = get_bin_pack_residual([head], bundles[:1])
            assert unplaced == bundles[:1]
    drivers = [dict(paper.spec.trial_resources)] * paper.spec.max_concurrent_trials
    assert get_bin_pack_residual([head], drivers)[0] == [], "the head should hold the concurrent trial drivers"


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_every_node_installs_pinned_msad_and_ray(name: str, prepared: dict[str, dict[str, Any]]) -> None:
    install = re.compile(r'pip install "ray\[default\]==(?P<ray>[^"]+)" '
                         r'"msad @ git\+https://github\.com/[^/]+/msad@v(?P<msad>[^"]+)"')
    for role in ("head_setup_commands", "worker_setup_commands"):  # each already merged with setup_commands
        pins = [m.groupdict() for command in prepared[name][role] for m in [install.search(command)] if m]
        assert pins == [{"ray": ray.__version__, "msad": importlib.metadata.version("msad")}], role


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_shared_storage_is_where_the_paper_sweep_writes(name: str, prepared: dict[str, dict[str, Any]],
                                                        paper: Sweep) -> None:
    assert any(f" {SHARED_MOUNT}" in command for command in prepared[name]["worker_setup_commands"])
    assert Path(paper.experiment_dir).is_relative_to(SHARED_MOUNT)


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_no_credential_fields(name: str) -> None:
    raw = load(CLUSTER / name)
    assert not {"aws_credentials", "gcp_credentials"} & set(raw["provider"])
    assert "ssh_private_key" not in raw.get("auth", {}) or "BEGIN" not in raw["auth"]["ssh_private_key"]


# ---------------------------------------------------------------------------------------------------------------------
# credentials, in every file of cluster/
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "aws_access_key_id = " + "AKIA" + "Q" * 16,
    "-----BEGIN " + "OPENSSH PRIVATE KEY-----",
    "password: " + "hunter2hunter2",
    "aws_secret_access_key = " + "x" * 40,
    "WANDB_API_KEY=" + "a1" * 20,
    '{"WANDB_API_KEY": "' + "local-" + "b" * 12 + '"}',
    "- {name: WANDB_API_KEY, value: " + "c" * 40 + "}",
])
def test_credential_scan_finds_credentials(text: str) -> None:
    assert credential_findings(text)


@pytest.mark.parametrize("text", [
    'WANDB_API_KEY="$WANDB_API_KEY"',
    '--runtime-env-json "{\\"env_vars\\": {\\"WANDB_API_KEY\\": \\"$WANDB_API_KEY\\"}}"',
    'kubectl create secret generic msad-wandb --from-literal=api-key="$WANDB_API_KEY"',
    "secretKeyRef: {name: msad-wandb, key: api-key, optional: true}",
    "authOptions:\n  mode: token",
])
def test_credential_scan_passes_references(text: str) -> None:
    assert credential_findings(text) == []


@pytest.mark.parametrize("path", sorted(CLUSTER.iterdir()), ids=lambda p: p.name)
def test_no_credentials_in_cluster_files(path: Path) -> None:
    assert credential_findings(path.read_text()) == []


# ---------------------------------------------------------------------------------------------------------------------
# KubeRay
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return load(KUBERAY)


def containers(rayjob: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}
    return {name: group["template"]["spec"]["containers"] for name, group in groups.items()}


def test_rayjob_runs_the_paper_sweep_and_cleans_up(rayjob: dict[str, Any]) -> None:
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    spec = rayjob["spec"]
    entrypoint = shlex.split(spec["entrypoint"])
    assert entrypoint[:3] == ["python", "launch.py", "sweeps/paper.yaml"] and (REPO / entrypoint[2]).is_file()
    assert "--address auto" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayjob_is_pinned_to_the_installed_ray_and_msad(rayjob: dict[str, Any]) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    for group in containers(rayjob).values():
        for container in group:
            repository, tag = container["image"].split(":")
            assert repository == "rayproject/ray" and tag.startswith(f"{ray.__version__}-"), container["image"]
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    release = f"/msad/archive/refs/tags/v{importlib.metadata.version('msad')}.zip"
    assert runtime_env["working_dir"].endswith(release)
    assert [p for p in runtime_env["pip"] if p.startswith("msad @ ") and p.endswith(release)]


def test_rayjob_gpu_workers_fit_a_paper_trial(rayjob: dict[str, Any], paper: Sweep) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    (head,) = containers(rayjob)["head"]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    worker_group = cluster["workerGroupSpecs"][0]
    assert worker_group["minReplicas"] == 0 and worker_group["maxReplicas"] >= paper.spec.max_concurrent_trials
    assert cluster["enableInTreeAutoscaling"] is True
    (worker,) = worker_group["template"]["spec"]["containers"]
    limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
    assert int(limits["nvidia.com/gpu"]) == int(requests["nvidia.com/gpu"]) == 8
    pod = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}
    for bundles in trial_bundles(paper):
        assert get_bin_pack_residual([pod], bundles)[0] == []


def test_rayjob_keeps_secrets_out_and_endpoints_in(rayjob: dict[str, Any], paper: Sweep) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    for group, group_containers in containers(rayjob).items():
        for container in group_containers:
            keys = [e for e in container.get("env", []) if e["name"] == "WANDB_API_KEY"]
            if group == "head":  # the sweep driver, the only W&B client, runs on the head: a Secret, never a value
                (wandb,) = keys
                assert "value" not in wandb
                assert {"name", "key"} <= set(wandb["valueFrom"]["secretKeyRef"])
            else:
                assert keys == []  # workers never talk to W&B: the key stays off GPU pods
            assert SHARED_MOUNT in {Path(m["mountPath"]) for m in container["volumeMounts"]}
    assert "WANDB_API_KEY" not in rayjob["spec"]["runtimeEnvYAML"]  # Ray logs runtime envs
    assert Path(paper.experiment_dir).is_relative_to(SHARED_MOUNT)


# ---------------------------------------------------------------------------------------------------------------------
# README: the `ray` commands it shows exist in the installed Ray
# ---------------------------------------------------------------------------------------------------------------------


def readme_ray_commands() -> list[list[str]]:
    """Every `ray ...` command line of the README's bash blocks, as argv (continuations joined, comments dropped)."""
    text = (CLUSTER / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:1] == ["ray"]:
                commands.append(argv)
    return commands


def test_readme_ray_commands_use_existing_flags_and_files() -> None:
    commands = readme_ray_commands()
    assert {"up", "attach", "dashboard", "job", "exec", "down"} <= {argv[1] for argv in commands}
    for argv in commands:
        command: click.Command = ray_cli
        words = argv[1:]
        while isinstance(command, click.Group):
            command, words = command.commands[words[0]], words[1:]
        own = words[:words.index("--")] if "--" in words else words
        known = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}
        unknown = [w.split("=")[0] for w in own if w.startswith("-") and w.split("=")[0] not in known]
        assert unknown == [], f"{' '.join(argv)}: not an option of the installed Ray: {unknown}"
        for word in words:
            if re.fullmatch(r"(cluster|sweeps|configs)/[\w./-]+\.yaml", word):
                assert (REPO / word).is_file(), word
