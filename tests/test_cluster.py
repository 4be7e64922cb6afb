"""Cluster configs pass Ray's own validation (no cloud calls) and keep spot, scaling, privacy and install promises."""
from __future__ import annotations

import copy
import importlib
import os
import re
import shlex
import signal
import subprocess
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
AUTOSCALER_YAMLS = ["aws-spot.yaml", "local.yaml"]
LOOPBACK = {"127.0.0.1", "localhost"}
OPEN_CIDRS = {"0.0.0.0/0", "::/0"}
RAY_PORTS = (6379, 8000, 8076, 8265, 10001)  # GCS, Serve, object manager, dashboard/job API, client


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _prepared(name: str) -> dict:
    """The config as `ray up` sees it: Ray's defaults filled in, then Ray's schema checked."""
    config = prepare_config(_load(name))
    validate_config(config)
    return config


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _image_pattern(gpu: bool) -> re.Pattern:
    """rayproject/ray pinned to the installed Ray and to Python 3.11 (the project's floor)."""
    return re.compile(rf"rayproject/ray:{re.escape(ray.__version__)}-py311{'-gpu' if gpu else ''}")


# ---------------------------------------------------------------- Ray's validation

@pytest.mark.parametrize("name", AUTOSCALER_YAMLS)
def test_autoscaler_yaml_passes_ray_validation(name):
    config = _prepared(name)
    assert config["cluster_name"].startswith("spotlm")
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("name", AUTOSCALER_YAMLS)
@pytest.mark.parametrize("where", ["top level", "auth"])
def test_unknown_key_is_rejected(name, where):
    raw = _load(name)
    (raw if where == "top level" else raw.setdefault("auth", {}))["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        validate_config(prepare_config(raw))


def test_unknown_node_type_key_is_rejected():
    raw = _load("aws-spot.yaml")
    raw["available_node_types"]["gpu_1x_spot"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(raw))


# ---------------------------------------------------------------- AWS: spot, sizes, EC2 requests

def _worker_types(config: dict) -> dict:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def _is_gpu_instance(instance_type: str) -> bool:
    return instance_type.split(".")[0][0] in "gp"  # EC2's accelerated families: g4dn, g5, g6, p4d, p5, ...


def test_aws_workers_are_spot_and_head_is_on_demand():
    config = _prepared("aws-spot.yaml")
    head = config["available_node_types"][config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]
    assert not _is_gpu_instance(head["node_config"]["InstanceType"])
    assert head["resources"] == {"CPU": 0}  # tasks go to workers: the head keeps drivers and the GCS
    workers = _worker_types(config)
    assert any(_is_gpu_instance(w["node_config"]["InstanceType"]) for w in workers.values())
    for name, worker in workers.items():
        market = worker["node_config"].get("InstanceMarketOptions", {})
        assert market.get("MarketType") == "spot", name
        # Ray replaces a reclaimed node; a persistent request would come back on its own.
        assert market["SpotOptions"] == {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
    # One-time spot instances cannot be stopped: scaling down must terminate.
    assert config["provider"]["cache_stopped_nodes"] is False


def test_aws_worker_counts_and_idle_timeout_are_sane():
    config = _prepared("aws-spot.yaml")
    assert config["available_node_types"][config["head_node_type"]]["max_workers"] == 0
    workers = _worker_types(config)
    assert all(w["min_workers"] == 0 for w in workers.values())  # scale from zero: idle costs nothing
    assert all(1 <= w["max_workers"] <= config["max_workers"] for w in workers.values())
    assert 1 <= config["max_workers"] <= 64
    assert 0 < config["idle_timeout_minutes"] <= 30


def _enum_errors(value, shape, path: str) -> list[str]:
    """Values outside botocore's enums (instance types, market types, volume types, ...)."""
    if shape.type_name == "structure" and isinstance(value, dict):
        return [e for k, v in value.items() if k in shape.members
                for e in _enum_errors(v, shape.members[k], f"{path}.{k}")]
    if shape.type_name == "list" and isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _enum_errors(v, shape.member, f"{path}[{i}]")]
    if getattr(shape, "enum", None) and value not in shape.enum:
        return [f"{path}: {value!r} is not one of EC2's values"]
    return []


def _run_instances_shape():
    """The request shape of EC2 RunInstances, from botocore's bundled model (no network)."""
    import botocore.session

    return botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape


def test_aws_node_configs_are_valid_run_instances_requests():
    """Ray passes node_config to EC2 RunInstances: check it against botocore's local model."""
    from botocore.validate import ParamValidator

    shape = _run_instances_shape()
    for name, node_type in _load("aws-spot.yaml")["available_node_types"].items():
        request = {**node_type["node_config"], "MinCount": 1, "MaxCount": 1}
        report = ParamValidator().validate(request, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
        assert _enum_errors(request, shape, name) == []


def test_botocore_check_catches_a_misspelt_spot_option():
    from botocore.validate import ParamValidator

    shape = _run_instances_shape()
    node_config = copy.deepcopy(_load("aws-spot.yaml")["available_node_types"]["gpu_1x_spot"]["node_config"])
    node_config["InstanceMarketOptions"]["SpotOptions"]["InterruptionBehavior"] = "terminate"
    node_config["InstanceType"] = "g5.2xlarg"
    request = {**node_config, "MinCount": 1, "MaxCount": 1}
    assert "InterruptionBehavior" in ParamValidator().validate(request, shape).generate_report()
    assert _enum_errors(request, shape, "gpu") == ["gpu.InstanceType: 'g5.2xlarg' is not one of EC2's values"]


def test_aws_images_match_the_installed_ray():
    docker = _load("aws-spot.yaml")["docker"]
    assert _image_pattern(gpu=False).fullmatch(docker["head_image"])
    assert _image_pattern(gpu=True).fullmatch(docker["worker_image"])
    for name, node_type in _worker_types(_load("aws-spot.yaml")).items():
        image = node_type.get("docker", {}).get("worker_image", docker["worker_image"])
        assert _image_pattern(_is_gpu_instance(node_type["node_config"]["InstanceType"])).fullmatch(image), name


# ---------------------------------------------------------------- the dashboard stays private

def _dashboard_hosts(start_commands: list[str]) -> list[str]:
    return [m for cmd in start_commands for m in re.findall(r"--dashboard-host[= ](\S+)", cmd)]


@pytest.mark.parametrize("name", AUTOSCALER_YAMLS)
def test_dashboard_listens_on_loopback_only(name):
    config = _prepared(name)
    hosts = _dashboard_hosts(config["head_start_ray_commands"])
    assert hosts and set(hosts) <= LOOPBACK
    assert not any("0.0.0.0" in cmd for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"])


def _opens_a_ray_port_to_the_world(rule: dict) -> bool:
    cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
    cidrs |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
    if not cidrs & OPEN_CIDRS:
        return False
    if rule.get("IpProtocol") == "-1":
        return True
    return any(rule.get("FromPort", 0) <= port <= rule.get("ToPort", 65535) for port in RAY_PORTS)


def test_aws_security_group_opens_no_ray_port():
    config = _prepared("aws-spot.yaml")
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not any(_opens_a_ray_port_to_the_world(r) for r in rules)
    # The rule check itself: an 8265 rule open to the world is caught.
    assert _opens_a_ray_port_to_the_world(
        {"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]})


# ---------------------------------------------------------------- the project gets installed

def _pip_extras(commands: list[str]) -> list[str]:
    """The extras of every `pip install ...spotlm...[extra]` among the commands."""
    return [m for cmd in commands if "pip install" in cmd for m in re.findall(r"spotlm[-\w]*\[(\w+)\]", cmd)]


def test_aws_setup_installs_the_project_with_the_right_extra():
    config = _prepared("aws-spot.yaml")
    assert config["file_mounts"] == {"~/spotlm": "."}  # the checkout `ray up` runs in (the repo root)
    assert (ROOT / "pyproject.toml").exists() and ".gitignore" in config["rsync_filter"]
    assert _pip_extras(config["head_setup_commands"]) == ["cpu"]
    assert _pip_extras(config["worker_setup_commands"]) == ["gpu"]  # the default worker: GPU types
    for name, node_type in _worker_types(config).items():
        commands = node_type.get("worker_setup_commands", config["worker_setup_commands"])
        expected = "gpu" if _is_gpu_instance(node_type["node_config"]["InstanceType"]) else "cpu"
        assert _pip_extras(commands) == [expected], name
        assert any("~/spotlm" in cmd for cmd in commands), name
    assert {"cpu", "gpu"} <= _extras()


def test_local_setup_installs_the_project_into_the_venv_ray_runs_from():
    config = _prepared("local.yaml")
    assert config["file_mounts"] == {"~/spotlm": "."}
    assert _pip_extras(config["head_setup_commands"]) and set(_pip_extras(config["head_setup_commands"])) <= _extras()
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert cmd.startswith("source ~/spotlm-venv/bin/activate && "), cmd


# ---------------------------------------------------------------- the spot interruption watcher

class _FakeIMDS(BaseHTTPRequestHandler):
    """EC2's instance metadata service, IMDSv2: a token first, then the spot notice (404 until set)."""

    token, notice, requests = "tok-123", threading.Event(), []

    def do_PUT(self):  # noqa: N802
        self.requests.append(("PUT", self.path))
        ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        self._reply(200 if ok else 400, self.token if ok else "")

    def do_GET(self):  # noqa: N802
        self.requests.append(("GET", self.path))
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            self._reply(401, "")
        elif self.path == "/latest/meta-data/spot/instance-action" and self.notice.is_set():
            self._reply(200, '{"action": "terminate", "time": "2026-11-22T10:00:00Z"}')
        else:
            self._reply(404, "")

    def _reply(self, status: int, body: str):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def _watcher_command() -> str:
    (cmd,) = [c for c in _load("aws-spot.yaml")["worker_start_ray_commands"] if "spot/instance-action" in c]
    return cmd


def _as_ray_runs_it(cmd: str, head_ip: str) -> str:
    """The shell command a worker container runs for one start command (see NodeUpdater / DockerCommandRunner)."""
    from ray.autoscaler._private.command_runner import _with_environment_variables, _with_interactive
    from ray.autoscaler._private.util import with_head_node_ip

    cmd = _with_environment_variables(with_head_node_ip([cmd], head_ip)[0], {"RAY_OVERRIDE_RESOURCES": {"GPU": 1}})
    return " ".join(_with_interactive(cmd))


def _wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def fake_imds():
    _FakeIMDS.notice.clear()
    _FakeIMDS.requests.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeIMDS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/latest"
    server.shutdown()


def test_spot_watcher_drains_the_node_once_the_notice_appears(fake_imds, tmp_path):
    # `ray` and `python` are stand-ins on the PATH that the image's ~/.bashrc would set up.
    bin_dir, calls = tmp_path / "bin", tmp_path / "ray-calls"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(f"#!/bin/bash\nprintf '%s\\n' \"$@\" >> {calls}\n")
    (bin_dir / "python").write_text('#!/bin/bash\necho "ray.init: connected"\necho "node-at-$RAY_ADDRESS"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / ".bashrc").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    # Its lock and log files move into tmp_path; nothing else of the command changes.
    cmd = _as_ray_runs_it(_watcher_command().replace("/tmp/spotlm-spot-watch", f"{tmp_path}/spotlm-spot-watch"),
                          head_ip="10.0.0.5")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "SPOTLM_IMDS_URL": fake_imds,
           "SPOTLM_SPOT_POLL_S": "0.1", "no_proxy": "*"}
    groups = []
    try:
        for _ in range(2):  # started twice, as a repeated `ray up` would: one watcher holds the lock
            proc = subprocess.Popen(["bash", "-c", cmd], env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            groups.append(proc.pid)
            assert proc.wait(timeout=30) == 0  # the start command returns; the watcher stays
        assert _wait_for(lambda: _FakeIMDS.requests.count(("GET", "/latest/meta-data/spot/instance-action")) >= 3)
        assert not calls.exists()  # polling, no notice yet: nothing drained
        _FakeIMDS.notice.set()
        assert _wait_for(lambda: calls.exists() and "--deadline-remaining-seconds=90" in calls.read_text())
        time.sleep(0.5)  # a second watcher, had it run, would have drained too by now
        assert calls.read_text().splitlines() == [
            "drain-node", "--address=10.0.0.5:6379", "--node-id=node-at-10.0.0.5:6379",
            "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=EC2 spot interruption notice",
            "--deadline-remaining-seconds=90"]
        assert "draining this node" in (tmp_path / "spotlm-spot-watch.log").read_text()
    finally:
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_spot_watcher_uses_real_ray_cli_options():
    from ray.core.generated import autoscaler_pb2
    from ray.scripts.scripts import drain_node

    cmd = _watcher_command()
    options = {p.opts[0].lstrip("-") for p in drain_node.params}
    used = set(re.findall(r"ray drain-node(.*?)'", cmd, re.S)[0].replace("\n", " ").split())
    assert {u.split("=", 1)[0].lstrip("-") for u in used if u.startswith("--")} <= options
    reason = re.search(r"--reason=(\w+)", cmd).group(1)
    assert autoscaler_pb2.DrainNodeReason.Value(reason) == autoscaler_pb2.DRAIN_NODE_REASON_PREEMPTION


# ---------------------------------------------------------------- KubeRay

def _kuberay_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if d]


def _raycluster() -> dict:
    (cr,) = [d for d in _kuberay_docs() if d["kind"] == "RayCluster"]
    return cr


def _groups(cr: dict) -> list[tuple[str, dict]]:
    return [("head", cr["spec"]["headGroupSpec"])] + [(g["groupName"], g) for g in cr["spec"]["workerGroupSpecs"]]


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container comes first


def _is_gpu_group(group: dict) -> bool:
    return "nvidia.com/gpu" in _ray_container(group).get("resources", {}).get("limits", {})


def test_kuberay_manifest_translates_through_rays_kuberay_autoscaler():
    """What KubeRay's autoscaler sidecar does with the CR: derive the autoscaling config, validate it."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = _raycluster()
    cr["metadata"].setdefault("namespace", "default")  # the API server fills it in
    config = _derive_autoscaling_config_from_ray_cr(cr)
    types = config["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert all(t["min_workers"] == 0 for t in types.values())
    assert 1 <= config["max_workers"] <= 64
    assert 0 < config["idle_timeout_minutes"] <= 30


def test_kuberay_manifest_structure():
    cr = _raycluster()
    assert (cr["apiVersion"], cr["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cr["spec"]
    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    workers = spec["workerGroupSpecs"]
    assert workers and any(_is_gpu_group(g) for g in workers)
    for group in workers:
        assert 0 == group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
        assert isinstance(group["rayStartParams"], dict)
    for name, group in _groups(cr):
        container = _ray_container(group)
        assert _image_pattern(_is_gpu_group(group)).fullmatch(container["image"]), name
        if _is_gpu_group(group):
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert int(limits["nvidia.com/gpu"]) >= 1 and limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"]
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), name


def _capacity(group: dict) -> str:
    selector = group["template"]["spec"].get("nodeSelector", {})
    values = {str(v).lower() for k, v in selector.items()
              if k in ("karpenter.sh/capacity-type", "eks.amazonaws.com/capacityType", "cloud.google.com/gke-spot")}
    return "spot" if values & {"spot", "true"} else "on-demand" if values else "unspecified"


def test_kuberay_head_on_demand_workers_on_spot_with_time_to_drain():
    cr = _raycluster()
    assert _capacity(cr["spec"]["headGroupSpec"]) == "on-demand"
    for group in cr["spec"]["workerGroupSpecs"]:
        assert _capacity(group) == "spot", group["groupName"]
        env = {e["name"]: e["value"] for e in _ray_container(group).get("env", [])}
        grace = group["template"]["spec"]["terminationGracePeriodSeconds"]
        # Ray's SIGTERM drain must finish inside the pod's grace period.
        assert 0 < float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]) < grace, group["groupName"]


def test_kuberay_dashboard_is_not_exposed():
    docs, cr = _kuberay_docs(), _raycluster()
    head = cr["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert not any(d.get("kind") in ("Service", "Ingress") for d in docs)  # no extra door to 8265
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    cluster_pods = {"ray.io/cluster": cr["metadata"]["name"]}  # the label KubeRay puts on its pods
    assert policy["spec"]["podSelector"]["matchLabels"] == cluster_pods
    assert "Ingress" in policy["spec"]["policyTypes"]
    sources = [peer["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert sources == [cluster_pods]


def test_kuberay_pods_install_the_project_dependencies():
    for name, group in _groups(_raycluster()):
        container, pod = _ray_container(group), group["template"]["spec"]
        command = " ".join(container["command"])
        assert _pip_extras([command]) == ["gpu" if _is_gpu_group(group) else "cpu"], name
        mount = next(m for m in container["volumeMounts"] if m["name"] == "spotlm-project")
        assert f"cp -rL {mount['mountPath']} " in command
        volume = next(v for v in pod["volumes"] if v["name"] == "spotlm-project")
        assert volume["configMap"]["name"] == "spotlm-project"


# ---------------------------------------------------------------- the README's commands

def _readme_commands() -> list[str]:
    """Every shell command in cluster/README.md's code blocks, continuation lines joined."""
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _job_argvs() -> list[tuple[str, list[str]]]:
    out = []
    for cmd in _readme_commands():
        if cmd.startswith("ray job submit"):
            argv = shlex.split(cmd, comments=True)
            entry = argv[argv.index("--") + 1:]
            assert entry[:2] == ["python", "-m"] and entry[2].startswith("jobs."), cmd
            out.append((entry[2].removeprefix("jobs."), entry[3:]))
    return out


def test_readme_uses_the_cluster_files_and_the_private_dashboard():
    commands = _readme_commands()
    for cmd in commands:
        for path in re.findall(r"cluster/[\w.-]+\.yaml", cmd):
            assert (ROOT / path).exists(), cmd
    submits = [c for c in commands if c.startswith("ray job submit")]
    assert submits and all("--address http://127.0.0.1:8265" in c and "--working-dir ." in c for c in submits)
    stages = {stage for stage, _ in _job_argvs()}
    assert {"tokenize", "build_index", "train", "eval", "serve"} <= stages
    for verb in ("ray up", "ray attach", "ray dashboard", "ray down"):
        assert any(c.startswith(verb) for c in commands), verb


@pytest.mark.parametrize("stage,argv", [pytest.param(s, a, id=f"{s}-{i}") for i, (s, a) in enumerate(_job_argvs())])
def test_readme_job_flags_parse(stage, argv, monkeypatch):
    """Each job command's flags parse into that job's config (the job itself does not run)."""
    try:
        module = importlib.import_module(f"jobs.{stage}")
    except ModuleNotFoundError as e:
        if e.name != f"jobs.{stage}":
            raise
        pytest.skip(f"jobs.{stage} does not exist yet")

    class Parsed(Exception):
        pass

    real = module.parse_config

    def parse_then_stop(cls, args, *rest, **kw):
        raise Parsed(real(cls, args, *rest, **kw))

    monkeypatch.setattr(module, "parse_config", parse_then_stop)
    # Shell variables in the README stand for user values.
    argv = [re.sub(r"\$\{?\w+\}?", "x", a) for a in argv]
    with pytest.raises(Parsed):
        module.main(argv)
