"""The Kubernetes manifests, checked without a cluster.

1. Validation: core kinds against the real Kubernetes OpenAPI schemas
   (kubernetes-validate, strict: unknown fields are errors), the TFJob and
   MPIJob against their operators' CRD openAPIV3Schema (k8s/schemas, carried
   in the repository; DISTADAM_SHARED=<dir> reads <dir>/k8s/crds instead),
   tightened the way the API server prunes: a field the schema does not
   declare would be silently dropped, so here it fails.
2. Policy: every pod non-root, no privilege escalation, no capabilities,
   read-only root filesystem, CPU/memory/ephemeral-storage requests and
   limits, size-limited emptyDirs; NetworkPolicies admit the collective ports
   only from the job's own pods and let the pods reach only each other and
   cluster DNS; replica counts agree wherever they are repeated; the image is
   pinned, multi-stage and carries no SSH host key.
3. Execution: each job's containers run locally with what the Job controller,
   the training-operator or the mpi-operator would inject, and train a few
   steps to identical weights on every rank.
"""

import copy
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
POD_RUNNER = ROOT / "tests" / "workers" / "k8s_pod.py"
VARIANTS = ["indexed-job", "tfjob", "mpijob", "gpu"]
# Oldest Kubernetes the manifests target: Indexed Jobs with the
# batch.kubernetes.io/job-name pod label (1.27+) and NetworkPolicy endPort (1.25+).
KUBERNETES_VERSION = "1.31"
NAMESPACE = "default"
EXECUTION_STEPS = 4


SCHEMAS = K8S / "schemas"


def crd_dir() -> Path:
    """The repository's copies of the operators' CRDs; DISTADAM_SHARED=<dir>
    overrides them with <dir>/k8s/crds (e.g. to try other operator versions)."""
    override = os.environ.get("DISTADAM_SHARED")
    path = Path(override) / "k8s" / "crds" if override else SCHEMAS
    if not sorted(path.glob("*.yaml")):
        pytest.fail(f"no CRDs at {path}" + (" (from DISTADAM_SHARED)" if override else ""))
    return path


# ------------------------------------------------------------------ loading
def manifest_files():
    return sorted(p for p in K8S.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and SCHEMAS not in p.parents)


def load_documents(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_raw_documents():
    return [(path, doc) for path in manifest_files() for doc in load_documents(path)]


def kustomize_build(variant):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    result = subprocess.run([kubectl, "kustomize", str(K8S / variant)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs, kind):
    matches = [doc for doc in docs if doc["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


# --------------------------------------------------------------- validation
def strict_crd_schema(schema):
    """Reject fields the CRD does not declare (the API server would prune them)."""
    if isinstance(schema, list):
        return [strict_crd_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict_crd_schema(value) for key, value in schema.items()}
    if (schema.get("type") == "object" and isinstance(schema.get("properties"), dict)
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    return schema


def crd_schemas():
    schemas = {}
    for path in sorted(crd_dir().glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schemas[(f"{group}/{version['name']}", kind)] = strict_crd_schema(
                    version["schema"]["openAPIV3Schema"])
    return schemas


def pod_templates(doc):
    """(replica type, pod template) for every pod the resource creates."""
    if doc["kind"] == "Job":
        return [("Job", doc["spec"]["template"])]
    if doc["kind"] == "TFJob":
        return [(name, spec["template"]) for name, spec in doc["spec"]["tfReplicaSpecs"].items()]
    if doc["kind"] == "MPIJob":
        return [(name, spec["template"]) for name, spec in doc["spec"]["mpiReplicaSpecs"].items()]
    return []


def validate(doc, crds):
    """Raise on any schema violation of ``doc`` (core kind or custom resource)."""
    key = (doc["apiVersion"], doc["kind"])
    if key in crds:
        jsonschema.validate(doc, crds[key], cls=jsonschema.Draft7Validator)
        # The CRD embeds PodTemplateSpec; check the pods against core v1 as well.
        for replica, template in pod_templates(doc):
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "PodTemplate",
                 "metadata": {"name": f"{doc['metadata']['name']}-{replica.lower()}"}, "template": template},
                KUBERNETES_VERSION, strict=True)
    elif doc["apiVersion"].startswith("kubeflow.org/"):
        raise AssertionError(f"no CRD for {key} in {crd_dir()}")
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module")
def crds():
    return crd_schemas()


def test_schemas_are_the_recorded_upstream_files():
    """Each CRD in k8s/schemas is the file k8s/schemas/README.md names, byte
    for byte (its SHA-256 is recorded there), and both kinds are covered."""
    readme = (SCHEMAS / "README.md").read_text()
    files = sorted(SCHEMAS.glob("*.yaml"))
    assert [f.name for f in files] == ["kubeflow.org_mpijobs.yaml", "kubeflow.org_tfjobs.yaml"]
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{path.name}`"))
        assert f"`{digest}`" in row, f"{path.name}: SHA-256 {digest} is not the one recorded in the README"
        assert "https://github.com/kubeflow/" in row
    assert "Apache License 2.0" in readme
    kinds = {yaml.safe_load(p.read_text())["spec"]["names"]["kind"] for p in files}
    assert kinds == {"TFJob", "MPIJob"}


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates(path, crds):
    docs = load_documents(path)
    assert docs, f"{path} holds no resources"
    for doc in docs:
        validate(doc, crds)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kustomize_output_validates(variant, crds):
    docs = kustomize_build(variant)
    kinds = {doc["kind"] for doc in docs}
    assert {"PersistentVolumeClaim", "NetworkPolicy"} <= kinds
    for doc in docs:
        validate(doc, crds)


BROKEN = {
    "TFJob field typo": ("tfjob/tfjob.yaml", lambda d: d["spec"].update(tfReplicaSpec=d["spec"].pop("tfReplicaSpecs"))),
    "TFJob replicas not an integer": ("tfjob/tfjob.yaml",
                                      lambda d: d["spec"]["tfReplicaSpecs"]["Worker"].update(replicas="two")),
    "MPIJob unknown implementation": ("mpijob/mpijob.yaml", lambda d: d["spec"].update(mpiImplementation="LAM")),
    "MPIJob pod field typo": ("mpijob/mpijob.yaml",
                              lambda d: d["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
                              .update(imagePullPolcy="Always")),
    "Job unknown field": ("indexed-job/job.yaml", lambda d: d["spec"].update(completionsMode="Indexed")),
    "NetworkPolicy bad port type": ("indexed-job/networkpolicy.yaml",
                                    lambda d: d["spec"]["ingress"][0]["ports"][0].update(protocol=6)),
}


@pytest.mark.parametrize("name", BROKEN)
def test_validation_catches_broken_manifests(name, crds):
    relative, breakage = BROKEN[name]
    (doc,) = load_documents(K8S / relative)
    broken = copy.deepcopy(doc)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(broken, crds)


# ------------------------------------------------------------------- policy
def containers_of(template):
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_is_locked_down_and_bounded(variant):
    docs = kustomize_build(variant)
    templates = [t for doc in docs for _, t in pod_templates(doc)]
    assert templates
    for template in templates:
        pod_security = template["spec"]["securityContext"]
        assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
        assert template["spec"].get("automountServiceAccountToken") is False
        for container in containers_of(template):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, container["name"]
            assert security["readOnlyRootFilesystem"] is True, container["name"]
            assert security["capabilities"]["drop"] == ["ALL"], container["name"]
            assert "add" not in security["capabilities"]
            resources = container["resources"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory", "ephemeral-storage"} <= set(resources[bound]), \
                    f"{container['name']}: {bound}"
            writable = {m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")}
            assert "/tmp" in writable, f"{container['name']}: a read-only root needs a writable /tmp"
        for volume in template["spec"].get("volumes", []):
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), f"emptyDir {volume['name']} has no sizeLimit"
            if variant == "gpu":
                assert resources["limits"]["nvidia.com/gpu"] >= 1
            else:
                assert "nvidia.com/gpu" not in resources["limits"]


@pytest.mark.parametrize("variant", ["indexed-job", "tfjob", "mpijob"])
def test_training_pods_mount_the_checkpoint_claim(variant):
    docs = kustomize_build(variant)
    claim = find(docs, "PersistentVolumeClaim")["metadata"]["name"]
    for doc in docs:
        for replica, template in pod_templates(doc):
            if replica == "Launcher":
                continue  # the MPI launcher only starts processes on the workers
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            (container,) = template["spec"]["containers"]
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/checkpoints")
            assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim


def collective_ports(variant, docs):
    if variant == "mpijob":
        mpijob = find(docs, "MPIJob")
        env = {e["name"]: e["value"] for e in
               mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["env"]}
        btl_low = int(env["OMPI_MCA_btl_tcp_port_min_v4"])
        btl = set(range(btl_low, btl_low + int(env["OMPI_MCA_btl_tcp_port_range_v4"])))
        oob_low, oob_high = map(int, env["OMPI_MCA_oob_tcp_dynamic_ipv4_ports"].split("-"))
        worker = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
        ssh = {p["containerPort"] for p in worker["ports"]}
        return btl | set(range(oob_low, oob_high + 1)) | ssh
    ports = set()
    for doc in docs:
        for _, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                ports |= {p["containerPort"] for p in container.get("ports", [])}
    return ports


DNS_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
DNS_PORTS = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]


def port_set(ports):
    admitted = set()
    for port in ports:
        assert port["protocol"] == "TCP"
        admitted |= set(range(port["port"], port.get("endPort", port["port"]) + 1))
    return admitted


def admits_address(rules, direction, address):
    """Whether any rule lets traffic go to/come from a plain IP address:
    only an ipBlock, or a rule with no peers at all, can."""
    ip = ipaddress.ip_address(address)
    for rule in rules:
        peers = rule.get(direction)
        if not peers:
            return True  # no 'to'/'from': every address
        for peer in peers:
            block = peer.get("ipBlock")
            if block and ip in ipaddress.ip_network(block["cidr"]) and not any(
                    ip in ipaddress.ip_network(e) for e in block.get("except", [])):
                return True
    return False


@pytest.mark.parametrize("variant", ["indexed-job", "tfjob", "mpijob"])
def test_network_policy_admits_only_own_pods_on_collective_ports(variant):
    docs = kustomize_build(variant)
    policy = find(docs, "NetworkPolicy")["spec"]
    pod_labels = [t["metadata"]["labels"] for doc in docs for _, t in pod_templates(doc)]
    selector = policy["podSelector"]["matchLabels"]
    assert all(selector.items() <= labels.items() for labels in pod_labels), "policy misses some job pods"
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    admitted = set()
    for rule in policy["ingress"]:
        assert rule["from"] == [{"podSelector": {"matchLabels": selector}}], "admits pods outside the job"
        admitted |= port_set(rule["ports"])
    assert admitted == collective_ports(variant, docs)


@pytest.mark.parametrize("variant", ["indexed-job", "tfjob", "mpijob"])
def test_network_policy_lets_pods_reach_only_each_other_and_dns(variant):
    docs = kustomize_build(variant)
    policy = find(docs, "NetworkPolicy")["spec"]
    selector = policy["podSelector"]["matchLabels"]
    own, dns = [], []
    for rule in policy["egress"]:
        assert rule.get("to") and rule.get("ports"), f"an egress rule without peers or ports allows too much: {rule}"
        if rule["to"] == [{"podSelector": {"matchLabels": selector}}]:
            own.append(port_set(rule["ports"]))
        elif rule["to"] == [DNS_PEER]:
            assert sorted(rule["ports"], key=str) == sorted(DNS_PORTS, key=str)
            dns.append(rule)
        else:
            raise AssertionError(f"egress to something outside the job: {rule['to']}")
    assert own == [collective_ports(variant, docs)] and len(dns) == 1
    for address in ("169.254.169.254", "fd00:ec2::254", "8.8.8.8", "10.0.0.1"):  # metadata, Internet, other pods
        assert not admits_address(policy["egress"], "to", address), address
        assert not admits_address(policy["ingress"], "from", address), address


@pytest.mark.parametrize("variant", ["indexed-job", "tfjob"])
def test_collective_servers_name_what_confines_them(variant):
    """strategy_from_env() warns unless DISTADAM_NETWORK_CONFINED names the
    confinement: here the NetworkPolicy that selects these very pods."""
    docs = kustomize_build(variant)
    policy = find(docs, "NetworkPolicy")
    for doc in docs:
        for _, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert env.get("DISTADAM_NETWORK_CONFINED") == f"NetworkPolicy {policy['metadata']['name']}"
                assert policy["spec"]["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()


def test_replica_counts_agree():
    job = find(kustomize_build("indexed-job"), "Job")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(env["DISTADAM_WORLD_SIZE"])
    assert job["spec"]["completionMode"] == "Indexed"

    mpijob = find(kustomize_build("mpijob"), "MPIJob")["spec"]
    args = mpijob["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["args"]
    assert int(args[args.index("-np") + 1]) == mpijob["mpiReplicaSpecs"]["Worker"]["replicas"] * mpijob["slotsPerWorker"]


def pod_failure_policy_action(policy, container, exit_code, conditions=()):
    """What the Job controller does with a failed pod under ``policy``: the
    action of the first matching rule, or "Count" (counts against backoffLimit)."""
    for rule in policy["rules"]:
        codes = rule.get("onExitCodes")
        if codes and codes.get("containerName", container) == container:
            matched = exit_code in codes["values"]
            if matched == (codes["operator"] == "In"):
                return rule["action"]
        for condition in rule.get("onPodConditions", []):
            if condition["type"] in conditions and condition.get("status", "True") == "True":
                return rule["action"]
    return "Count"


def test_indexed_job_does_not_count_preemptions_as_failures(crds):
    """A worker that saved on SIGTERM exits EXIT_PREEMPTED (42); a pod the
    cluster disrupts has the DisruptionTarget condition: neither counts
    against backoffLimit, so repeated preemptions cannot fail the Job. A
    crash still counts. podFailurePolicy is valid only with restartPolicy Never."""
    from distadam.preemption import EXIT_PREEMPTED

    job = find(kustomize_build("indexed-job"), "Job")
    validate(job, crds)
    template = job["spec"]["template"]
    assert template["spec"]["restartPolicy"] == "Never"
    policy = job["spec"]["podFailurePolicy"]
    (container,) = [c["name"] for c in template["spec"]["containers"]]
    assert pod_failure_policy_action(policy, container, EXIT_PREEMPTED) == "Ignore"
    assert pod_failure_policy_action(policy, container, 137, ["DisruptionTarget"]) == "Ignore"
    for crash in (1, 75, 137):  # an error, the stall watchdog, an OOM kill
        assert pod_failure_policy_action(policy, container, crash) == "Count", crash
    broken = copy.deepcopy(job)
    broken["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] = "42"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken, crds)


def test_tfjob_matches_what_the_training_operator_injects_into():
    tfjob = find(kustomize_build("tfjob"), "TFJob")
    for spec in tfjob["spec"]["tfReplicaSpecs"].values():
        names = [c["name"] for c in spec["template"]["spec"]["containers"]]
        assert "tensorflow" in names, "the operator sets TF_CONFIG only in the container named 'tensorflow'"
        container = spec["template"]["spec"]["containers"][names.index("tensorflow")]
        assert any(p["name"] == "tfjob-port" for p in container["ports"])


def dockerfile_stages(text):
    """[(FROM line, [instruction lines])] per stage, continuation lines joined."""
    stages, logical = [], []
    for line in text.replace("\\\n", " ").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            logical.append(line.strip())
    for line in logical:
        if line.startswith("FROM "):
            stages.append((line, []))
        elif stages:
            stages[-1][1].append(line)
    return stages


def test_dockerfile_builds_what_the_manifests_run():
    dockerfile = (K8S / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=" in dockerfile and "ARG TF_EXTRA=" in dockerfile
    assert "USER ${UID}" in dockerfile and "WORKDIR /app" in dockerfile
    # Every COPY source exists in the build context (the repository root).
    copied = []
    for line in dockerfile.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from=") for w in words):
            sources = [w for w in words[1:-1] if not w.startswith("--")]
            copied += sources
            missing = [source for source in sources if not (ROOT / source).exists()]
            assert not missing, f"Dockerfile copies {missing}, which the repository lacks"
    assert {"distadam", "examples", "pyproject.toml", "constraints.txt"} <= set(copied)
    ignore = (K8S / "Dockerfile.dockerignore").read_text().split()
    assert all(f"!{source}" in ignore or f"!{source}/" in ignore for source in copied), \
        "a COPY source is excluded from the build context by Dockerfile.dockerignore"
    # Every manifest's command refers to a file the image contains.
    for path, doc in all_raw_documents():
        for _, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                assert container["image"].split(":")[0] == "distadam"
                words = container.get("command", []) + container.get("args", [])
                for word in words:
                    if word.endswith((".py", ".sh")):
                        assert (ROOT / word).is_file(), f"{path}: {word} is not in the image"


def test_image_is_pinned_multi_stage_and_holds_no_ssh_secrets():
    dockerfile = (K8S / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    assert re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", base), f"base image not pinned by digest: {base}"
    assert base.split("@")[1] in (K8S / "README.md").read_text(), "k8s/README.md does not record the digest"
    stages = dockerfile_stages(dockerfile)
    assert len(stages) >= 2 and stages[0][0].endswith(" AS build"), [s[0] for s in stages]
    assert all(line.startswith("FROM ${BASE_IMAGE}") for line, _ in stages)
    build, final = stages[0][1], stages[-1][1]
    assert any(re.search(r"\bg\+\+", line) for line in build), "the build stage no longer builds Horovod?"
    for line in final:
        assert not re.search(r"\b(g\+\+|gcc|make|cmake|build-essential)\b", line), f"toolchain in the image: {line}"
    pip_installs = [line for line in build if "pip install" in line]
    assert pip_installs and all("-c constraints.txt" in line for line in pip_installs)
    assert any(line.startswith("COPY --from=build /opt/venv") for line in final)
    # No host key baked into the image, and no trust-on-first-use anywhere.
    for text in (dockerfile, *(p.read_text() for p in manifest_files())):
        assert "ssh-keygen" not in text
        assert not re.search(r"StrictHostKeyChecking\s+no", text)
        assert "UserKnownHostsFile /dev/null" not in text
    assert re.search(r"StrictHostKeyChecking yes", dockerfile)
    assert "rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_*" in dockerfile  # the package's own host keys


# ---------------------------------------------------------------- execution
def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalPod:
    """One pod's container as a local process group, kubelet-style: the
    container's command, args and env from the manifest plus injected
    variables; volumes are local directories; no inherited environment."""

    def __init__(self, name, template, container_name, injected_env, workdir, network=None):
        self.name = name
        spec = template["spec"]
        self.container = next(c for c in spec["containers"] if c["name"] == container_name)
        self.labels = template["metadata"].get("labels", {})
        self.mounts = {}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for mount in self.container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                local = workdir / "pvc" / volume["persistentVolumeClaim"]["claimName"]
            else:
                local = workdir / "pods" / name / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            self.mounts[mount["mountPath"]] = local
        self.env = self._environment(injected_env, network)
        self.process = None

    def local_path(self, text):
        for mount_path, local in self.mounts.items():
            if text == mount_path or text.startswith(mount_path + "/"):
                return str(local) + text[len(mount_path):]
        return text

    def _field(self, path):
        if path == "metadata.namespace":
            return NAMESPACE
        if path == "metadata.name":
            return self.name
        if path.startswith("metadata.labels['") and path.endswith("']"):
            return self.labels[path[len("metadata.labels['"):-2]]
        raise AssertionError(f"the local kubelet does not know fieldRef {path!r}")

    def _environment(self, injected, network):
        env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "HOSTNAME": self.name, "PYTHONUNBUFFERED": "1"}
        for item in self.container.get("env", []):
            if "value" in item:
                env[item["name"]] = self.local_path(item["value"])
            else:
                env[item["name"]] = self._field(item["valueFrom"]["fieldRef"]["fieldPath"])
        env.update(injected)
        if network is not None:
            env["K8S_POD_NETWORK"] = json.dumps(network)
        return env

    def command(self, extra_args=()):
        words = [self.local_path(w) for w in self.container.get("command", []) + self.container.get("args", [])]
        return words + list(extra_args)

    def start(self, argv):
        cwd = ROOT if self.container.get("workingDir") == "/app" else None
        assert cwd is not None, "the image's code lives in /app"
        self.process = subprocess.Popen(argv, cwd=cwd, env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def kill(self):
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)


def python_in_pod(pod, extra_args):
    """``python SCRIPT ARGS`` from the manifest, run through the pod-network shim."""
    words = pod.command(extra_args)
    assert words[0] == "python", f"expected a python command, got {words}"
    return [sys.executable, str(POD_RUNNER), *words[1:]]


def run_pods(pods, argvs, timeout=240):
    outputs = {}
    try:
        for pod, argv in zip(pods, argvs, strict=True):
            pod.start(argv)
        for pod in pods:
            try:
                outputs[pod.name], _ = pod.process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"pod {pod.name} did not finish within {timeout}s")
    finally:
        for pod in pods:
            pod.kill()
    for pod in pods:
        assert pod.process.returncode == 0, f"pod {pod.name} failed:\n{outputs.get(pod.name, '')[-4000:]}"
    return outputs


def assert_ranks_agree(directory, pattern, ranks):
    files = [directory / pattern.format(rank=r) for r in range(ranks)]
    missing = [f for f in files if not f.exists()]
    assert not missing, f"no weights written to the checkpoint volume: {missing}"
    loaded = [dict(np.load(f)) for f in files]
    for rank, weights in enumerate(loaded):
        assert int(weights["steps"]) == EXECUTION_STEPS
        for key in loaded[0]:
            np.testing.assert_array_equal(weights[key], loaded[0][key], err_msg=f"rank {rank}: {key}")
    return loaded


FEW_STEPS = ["--epochs", "1", "--max-steps", str(EXECUTION_STEPS)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_indexed_job_runs_multi_worker_training(tmp_path):
    """Job controller: JOB_COMPLETION_INDEX and hostname <job>-<index>; cluster
    DNS: <hostname>.<subdomain>[.<namespace>.svc] for pods selected by the
    headless Service named by the pod template's subdomain."""
    docs = [doc for path in (K8S / "indexed-job").glob("*.yaml") if path.name != "kustomization.yaml"
            for doc in load_documents(path)]
    job, service = find(docs, "Job"), find(docs, "Service")
    template = copy.deepcopy(job["spec"]["template"])
    job_name = job["metadata"]["name"]
    template["metadata"]["labels"]["batch.kubernetes.io/job-name"] = job_name  # added by the controller

    subdomain = template["spec"]["subdomain"]
    assert service["metadata"]["name"] == subdomain and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    network = {}
    for index in range(job["spec"]["completions"]):
        local = f"127.0.0.1:{free_port()}"
        for domain in (subdomain, f"{subdomain}.{NAMESPACE}.svc"):
            network[f"{job_name}-{index}.{domain}:{service_port['targetPort']}"] = local

    pods = [LocalPod(f"{job_name}-{index}", template, "trainer", {"JOB_COMPLETION_INDEX": str(index)},
                     tmp_path, network)
            for index in range(job["spec"]["completions"])]
    run_pods(pods, [python_in_pod(pod, FEW_STEPS) for pod in pods])
    assert_ranks_agree(tmp_path / "pvc" / "distadam-checkpoints", "distadam-digits-{rank}.npz",
                       job["spec"]["completions"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tfjob_runs_multi_worker_training(tmp_path):
    """training-operator: TF_CONFIG in the container named 'tensorflow', with
    <job>-<type>-<i>.<namespace>.svc:<tfjob-port> for every replica."""
    (tfjob,) = load_documents(K8S / "tfjob" / "tfjob.yaml")
    job_name = tfjob["metadata"]["name"]
    replica_specs = tfjob["spec"]["tfReplicaSpecs"]
    cluster, network = {}, {}
    for replica_type, spec in replica_specs.items():
        container = next((c for c in spec["template"]["spec"]["containers"] if c["name"] == "tensorflow"), None)
        assert container, f"{replica_type}: no container named 'tensorflow', so the operator injects no TF_CONFIG"
        port = next((p["containerPort"] for p in container.get("ports", []) if p["name"] == "tfjob-port"), 2222)
        kind = replica_type.lower()
        cluster[kind] = [f"{job_name}-{kind}-{i}.{NAMESPACE}.svc:{port}" for i in range(spec["replicas"])]
        network.update({address: f"127.0.0.1:{free_port()}" for address in cluster[kind]})
    assert sum(len(v) for v in cluster.values()) > 1, "the operator sets no TF_CONFIG for one replica"

    pods = []
    for replica_type, spec in replica_specs.items():
        kind = replica_type.lower()
        for index in range(spec["replicas"]):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})
            pods.append(LocalPod(f"{job_name}-{kind}-{index}", spec["template"], "tensorflow",
                                 {"TF_CONFIG": tf_config}, tmp_path, network))
    run_pods(pods, [python_in_pod(pod, FEW_STEPS) for pod in pods])
    assert_ranks_agree(tmp_path / "pvc" / "distadam-checkpoints", "distadam-digits-tfjob-{rank}.npz", len(pods))


def horovod_available():
    venv_bin = Path(sys.executable).parent
    if not (venv_bin / "horovodrun").exists() or not (venv_bin / "mpirun").exists():
        return False
    probe = subprocess.run([sys.executable, "-c", "import horovod.tensorflow"], capture_output=True, timeout=120)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mpijob_runs_horovod_training(tmp_path):
    """mpi-operator: the launcher's own command (horovodrun ... --hostfile
    /etc/mpi/hostfile) runs for real, with the hostfile the operator would
    mount pointing at this machine: every worker pod is 127.0.0.1 with
    slotsPerWorker slots, so Open MPI starts the ranks locally instead of
    over ssh into the workers' sshd (which therefore is not executed), and
    the pod interface eth0 becomes lo. Needs Horovod and Open MPI in the venv
    (./dev setup builds them); skipped otherwise, since the launcher's
    command cannot run without them."""
    if not horovod_available():
        pytest.skip("Horovod/Open MPI not installed in this venv (scripts/install_horovod.sh)")
    (mpijob,) = load_documents(K8S / "mpijob" / "mpijob.yaml")
    spec = mpijob["spec"]
    workers = spec["mpiReplicaSpecs"]["Worker"]["replicas"]
    slots = spec.get("slotsPerWorker", 1)
    hostfile = tmp_path / "hostfile"
    # What the operator writes, one line per worker pod, with every pod on this machine.
    hostfile.write_text(f"localhost slots={workers * slots}\n")

    launcher_template = copy.deepcopy(spec["mpiReplicaSpecs"]["Launcher"]["template"])
    # Training processes run in the worker pods, which mount the checkpoint
    # volume; locally they share the launcher's mounts.
    worker_template = spec["mpiReplicaSpecs"]["Worker"]["template"]
    launcher_template["spec"]["volumes"] += [v for v in worker_template["spec"]["volumes"]
                                             if "persistentVolumeClaim" in v]
    worker_container = worker_template["spec"]["containers"][0]
    launcher_template["spec"]["containers"][0]["volumeMounts"] += [
        m for m in worker_container["volumeMounts"] if m["mountPath"] == "/checkpoints"]
    # The job's SSH key, which the operator generates and mounts at sshAuthMountPath.
    auth = job_ssh_key(tmp_path / "job-ssh")
    injected = {"OMPI_MCA_orte_default_hostfile": str(hostfile), "DISTADAM_SSH_AUTH_DIR": str(auth)}
    if os.geteuid() == 0:  # the image runs as uid 1000; this test machine may not
        injected.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    launcher = LocalPod(f"{mpijob['metadata']['name']}-launcher", launcher_template, "launcher", injected,
                        tmp_path)

    words = launcher.command(FEW_STEPS)
    assert words[:3] == ["bash", "scripts/mpijob_launcher.sh", "horovodrun"]
    words[words.index("--hostfile") + 1] = str(hostfile)
    words[words.index("--network-interface") + 1] = "lo"
    words[words.index("python")] = sys.executable
    words[2] = str(Path(sys.executable).parent / "horovodrun")
    run_pods([launcher], [words])
    known_hosts = Path(launcher.env["DISTADAM_SSH_KNOWN_HOSTS"]).read_text()
    assert known_hosts == f"@cert-authority * {(auth / 'id_rsa.pub').read_text().strip()}\n"
    assert_ranks_agree(tmp_path / "pvc" / "distadam-checkpoints", "distadam-digits-mpi-{rank}.npz",
                       workers * slots)


def job_ssh_key(directory):
    """What the mpi-operator mounts at sshAuthMountPath: the job's key pair
    (ECDSA, as the operator generates it) under the names it uses."""
    directory.mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-C", "job", "-f", str(directory / "id_rsa")],
                   check=True, timeout=30)
    (directory / "authorized_keys").write_text((directory / "id_rsa.pub").read_text())
    return directory


def fingerprint(path):
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    return out.split()[1]


@pytest.mark.timeout(120)
def test_mpijob_ssh_host_keys_are_per_pod_and_verified_within_the_job(tmp_path):
    """The workers' command runs for real, as two pods, up to the point where
    it would exec sshd (not installed here: DISTADAM_SSHD records the call):
    each pod makes its own host key, certified for its DNS names by the job
    key, and the launcher's known_hosts trusts exactly that key."""
    (mpijob,) = load_documents(K8S / "mpijob" / "mpijob.yaml")
    spec = mpijob["spec"]
    name, auth_path = mpijob["metadata"]["name"], spec["sshAuthMountPath"]
    worker_template = spec["mpiReplicaSpecs"]["Worker"]["template"]
    launcher_template = spec["mpiReplicaSpecs"]["Launcher"]["template"]
    for template in (worker_template, launcher_template):
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        assert env["DISTADAM_SSH_AUTH_DIR"] == auth_path
    auth = job_ssh_key(tmp_path / "job-ssh")
    other_job = job_ssh_key(tmp_path / "other-job-ssh")
    recorder = tmp_path / "sshd"
    recorder.write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > \"$TMPDIR/sshd.args\"\n")
    recorder.chmod(0o755)

    certificates = []
    for index in range(2):
        pod = LocalPod(f"{name}-worker-{index}", worker_template, "worker",
                       {"DISTADAM_SSH_AUTH_DIR": str(auth), "DISTADAM_SSHD": str(recorder)}, tmp_path)
        pod.env["TMPDIR"] = str(pod.mounts["/tmp"])  # the pod's /tmp emptyDir
        run_pods([pod], [pod.command()])
        sshd_dir = pod.mounts["/tmp"] / "sshd"
        args = (pod.mounts["/tmp"] / "sshd.args").read_text().split()
        assert args == ["-De", "-f", str(sshd_dir / "sshd_config")]
        config = (sshd_dir / "sshd_config").read_text()
        assert f"HostCertificate {sshd_dir}/host_ed25519_key-cert.pub" in config
        assert "PasswordAuthentication no" in config and "Port 2222" in config
        cert = subprocess.run(["ssh-keygen", "-L", "-f", str(sshd_dir / "host_ed25519_key-cert.pub")],
                              capture_output=True, text=True, check=True, timeout=30).stdout
        assert "host certificate" in cert
        assert fingerprint(auth / "id_rsa.pub") in cert and fingerprint(other_job / "id_rsa.pub") not in cert
        for principal in (f"{name}-worker-{index}.{name}.{NAMESPACE}.svc", f"{name}-worker-{index}"):
            assert re.search(rf"^\s+{re.escape(principal)}$", cert, re.M), cert
        certificates.append(fingerprint(sshd_dir / "host_ed25519_key.pub"))
    assert certificates[0] != certificates[1], "two pods share a host key"

    launcher = LocalPod(f"{name}-launcher", launcher_template, "launcher", {"DISTADAM_SSH_AUTH_DIR": str(auth)},
                        tmp_path)
    words = launcher.command()
    run_pods([launcher], [words[:2] + ["true"]])
    known_hosts = Path(launcher.env["DISTADAM_SSH_KNOWN_HOSTS"]).read_text().splitlines()
    assert known_hosts == [f"@cert-authority * {(auth / 'id_rsa.pub').read_text().strip()}"]


# ------------------------------------------------------- MPIJob preemption
MPI_FAKE_SSH = ROOT / "tests" / "workers" / "mpi_fake_ssh.py"
MPI_PREEMPTED_RANK = ROOT / "tests" / "workers" / "mpi_preempted_rank.py"
# A network namespace with only loopback for the whole local MPIJob: ORTE
# looks the pods' DNS names up, and here that fails at once instead of asking
# the machine's resolver; orted reaches mpirun over this namespace's 127.0.0.1.
NAMESPACE_HOLDER = ("import sys\nfrom distadam.launch import Sandbox\nSandbox(private_network=True)\n"
                    "print('ready', flush=True)\nsys.stdin.read()\n")


def kill_tagged(tag):
    """SIGKILL every process whose environment carries DISTADAM_TEST_JOB=tag."""
    marker = f"DISTADAM_TEST_JOB={tag}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue


def ancestors(pid):
    chain = []
    while pid > 1:
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        chain.append(pid)
    return chain


def wait_for_paths(paths, timeout, what, processes=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(Path(p).exists() for p in paths):
            return
        for process in processes:
            if process.poll() is not None:
                pytest.fail(f"{what}: {process.args[:4]} exited ({process.returncode}) first:\n"
                            f"{process.communicate()[0][-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"{what}: still missing after {timeout}s: {[str(p) for p in paths if not Path(p).exists()]}")


@pytest.mark.timeout(120)
def test_mpijob_worker_pods_forward_sigterm_to_every_rank(tmp_path):
    """The kubelet's SIGTERM to each worker pod's PID 1 reaches every training
    rank in the pod, and the pod waits while the ranks save. Executed: each
    worker pod's command from the YAML (its PID-1 wrapper, then
    mpijob_worker_sshd.sh with its per-pod host key), the launcher pod's
    command with the operator's hostfile, and a real Open MPI mpirun that
    starts orted in each worker pod through its "sshd" (tests/workers/
    mpi_fake_ssh.py hands the session to the pod, as sshd would) and orted
    the ranks there. Then SIGTERM to each pod's PID 1 only, as the kubelet
    sends it. (horovodrun --mpi runs this mpirun; it is called directly since
    horovodrun's own ssh pre-check needs a real sshd.)"""
    mpirun_path = Path(sys.executable).with_name("mpirun")
    if not mpirun_path.exists() or not Path(sys.executable).with_name("orted").exists():
        pytest.skip("Open MPI is not installed in this venv (scripts/install_horovod.sh)")
    if os.geteuid() != 0 or shutil.which("nsenter") is None:
        pytest.skip("entering the test's network namespace needs root and nsenter")
    (mpijob,) = load_documents(K8S / "mpijob" / "mpijob.yaml")
    spec = mpijob["spec"]
    name, workers, slots = mpijob["metadata"]["name"], spec["mpiReplicaSpecs"]["Worker"]["replicas"], \
        spec.get("slotsPerWorker", 1)
    worker_template = spec["mpiReplicaSpecs"]["Worker"]["template"]
    grace = worker_template["spec"].get("terminationGracePeriodSeconds", 30)  # 30: Kubernetes' default
    save_seconds = 1.5  # longer than orted's 1 s between its SIGTERM and SIGKILL
    auth = job_ssh_key(tmp_path / "job-ssh")
    results = tmp_path / "ranks"
    results.mkdir()
    sockets = Path(tempfile.mkdtemp(prefix="fake-sshd-"))  # a Unix socket path has 108 bytes at most
    tag = os.urandom(8).hex()
    sshd = tmp_path / "sshd"
    sshd.write_text(f"#!/bin/sh\nexec {sys.executable} {MPI_FAKE_SSH} serve \"$FAKE_SSHD_SOCKET\" \"$@\"\n")
    sshd.chmod(0o755)
    mpi_env = {"DISTADAM_TEST_JOB": tag, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
               "OMPI_MCA_mpi_yield_when_idle": "1"}

    holder = subprocess.Popen([sys.executable, "-c", NAMESPACE_HOLDER], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    enter = ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]
    pods, hosts = [], {}
    try:
        assert holder.stdout.readline() == "ready\n", "could not make the test's network namespace"
        for index in range(workers):
            pod = LocalPod(f"{name}-worker-{index}", worker_template, "worker",
                           {"DISTADAM_SSH_AUTH_DIR": str(auth), "DISTADAM_SSHD": str(sshd),
                            "FAKE_SSHD_SOCKET": str(sockets / f"{index}.sock"), **mpi_env}, tmp_path)
            pod.env["TMPDIR"] = str(pod.mounts["/tmp"])
            hosts[f"{name}-worker-{index}.{name}.{NAMESPACE}.svc"] = str(sockets / f"{index}.sock")
            pod.start(enter + pod.command())
            pods.append(pod)
        # WaitForWorkersReady: every worker's sshd listens before the launcher starts.
        wait_for_paths(hosts.values(), 30, "worker sshd", [p.process for p in pods])

        hostfile = tmp_path / "hostfile"  # what the operator mounts at /etc/mpi/hostfile
        hostfile.write_text("".join(f"{host} slots={slots}\n" for host in hosts))
        launcher = LocalPod(f"{name}-launcher", spec["mpiReplicaSpecs"]["Launcher"]["template"], "launcher",
                            # What the mpi-operator injects into an OpenMPI launcher:
                            {"OMPI_MCA_orte_keep_fqdn_hostnames": "true",
                             "OMPI_MCA_orte_default_hostfile": str(hostfile),
                             "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10",
                             "DISTADAM_SSH_AUTH_DIR": str(auth), "FAKE_SSH_HOSTS": json.dumps(hosts),
                             "OMPI_MCA_plm_rsh_agent": f"{sys.executable} {MPI_FAKE_SSH}", **mpi_env}, tmp_path)
        words = launcher.command()
        assert words[:4] == ["bash", "scripts/mpijob_launcher.sh", "horovodrun", "--mpi"], words
        np_ = words[words.index("-np") + 1]
        assert int(np_) == workers * slots
        launcher.start(enter + words[:2] + [str(mpirun_path), "-np", np_, "--hostfile", str(hostfile),
                                            "--bind-to", "none", sys.executable, str(MPI_PREEMPTED_RANK),
                                            str(results), str(save_seconds)])
        pods.append(launcher)
        ranks = range(workers * slots)
        wait_for_paths([results / f"{r}.started" for r in ranks], 60, "ranks", [launcher.process])
        # Every rank runs inside a worker pod: a descendant of that pod's PID 1.
        for rank in ranks:
            pid = int((results / f"{rank}.started").read_text())
            assert pods[rank // slots].process.pid in ancestors(pid), f"rank {rank} is not in its worker pod"

        for pod in pods[:workers]:
            os.kill(pod.process.pid, signal.SIGTERM)  # the kubelet signals PID 1 only
        for pod in pods[:workers]:
            try:
                pod.process.wait(timeout=min(grace, 30))
            except subprocess.TimeoutExpired:
                pass  # then the runtime's SIGKILL (below, in kill())
        for pod in pods:
            pod.kill()
        kill_tagged(tag)  # orted and the ranks, wherever they went; they hold the pods' output pipes
        outputs = {pod.name: pod.process.stdout.read() for pod in pods}
    finally:
        for pod in pods:
            pod.kill()
        kill_tagged(tag)
        holder.kill()
        holder.wait()
        shutil.rmtree(sockets, ignore_errors=True)
    log = "\n".join(f"--- {pod}:\n{out[-2000:]}" for pod, out in outputs.items())
    missing = [rank for rank in ranks if not (results / f"{rank}.sigterm").exists()]
    assert not missing, f"SIGTERM never reached ranks {missing}:\n{log}"
    unsaved = [rank for rank in ranks if not (results / f"{rank}.saved").exists()]
    assert not unsaved, f"ranks {unsaved} were killed while saving:\n{log}"
    for pod in pods[:workers]:
        assert pod.process.returncode == 128 + signal.SIGTERM, f"{pod.name}:\n{log}"
        assert "forwarded SIGTERM to rank process" in outputs[pod.name], log
    # The pods stopped by themselves, after their ranks saved (a pod still
    # running at the wait's bound is SIGKILLed: its status would not be 143).
    assert grace >= 60, "a save needs the grace period the README promises (60 s)"
