"""launch/k8s/pytorchjob.yaml: the Kubeflow PyTorchJob for elastic multi-node training.

No cluster here, so the manifest is checked as a cluster would read it: parsed with pyyaml,
the worker pod template validated against the Kubernetes JSON schema (kubernetes-validate,
strict: unknown fields are errors), the PyTorchJob fields the Training Operator acts on
checked one by one, and the trainer's own flags parsed by dcp_train's real parser.

Run: .venv/bin/python -m pytest tests/test_k8s.py -q
"""

from __future__ import annotations

import re
import shlex

import kubernetes_validate
import pytest
import yaml

from dcp_train.cli import parse_config
from dcp_train.train.loop import grad_accum_steps
from helpers import REPO

MANIFEST = REPO / "launch" / "k8s" / "pytorchjob.yaml"
SECRET_NAMES = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


@pytest.fixture(scope="module")
def job() -> dict:
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    assert len(docs) == 1, "one PyTorchJob per file"
    return docs[0]


def worker(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]


def container(job: dict) -> dict:
    (c,) = worker(job)["template"]["spec"]["containers"]
    return c


def trainer_flags(job: dict) -> list[str]:
    cmd = container(job)["command"]
    assert cmd[0] == "torchrun"
    i = cmd.index("-m")
    assert cmd[i + 1] == "dcp_train.main", shlex.join(cmd)
    return cmd[i + 2:]


def test_kind_and_elastic_policy(job):
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    policy = job["spec"]["elasticPolicy"]
    assert policy["rdzvBackend"] == "c10d"
    assert 1 <= policy["minReplicas"] <= policy["maxReplicas"]
    assert policy["maxRestarts"] >= 1
    # elastic jobs have workers only (no Master replica); the operator starts maxReplicas
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Worker"}
    assert worker(job)["replicas"] == policy["maxReplicas"]
    assert worker(job)["restartPolicy"] in ("OnFailure", "ExitCode")
    # the operator passes nnodes and the rendezvous as PET_* variables: the command must not
    # fix them, or elasticity is lost
    cmd = container(job)["command"]
    assert not [a for a in cmd if a.startswith(("--nnodes", "--rdzv", "--standalone"))], cmd
    assert f"--nproc_per_node={policy['nProcPerNode']}" in cmd
    assert container(job)["name"] == "pytorch"  # the container the operator configures


def test_pod_template_passes_the_kubernetes_schema(job):
    pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                    "metadata": {"name": job["metadata"]["name"]},
                    "template": worker(job)["template"]}
    version = kubernetes_validate.latest_version()
    assert kubernetes_validate.validate(pod_template, version, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(pod_template))  # the check does reject mistakes
    broken["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_trainer_flags_parse_and_fit_every_world_size(job):
    flags = trainer_flags(job)
    assert "--auto_resume" in flags  # every (re)start continues from the newest checkpoint
    cfg = parse_config(flags)  # the real parser: unknown flags or bad values fail here
    ck = cfg.checkpoint
    assert ck.auto_resume and ck.checkpoint_dir.startswith(("s3://", "gs://"))
    assert ck.local_checkpoint_dir
    policy = job["spec"]["elasticPolicy"]
    for nodes in range(policy["minReplicas"], policy["maxReplicas"] + 1):
        grad_accum_steps(cfg, nodes * policy["nProcPerNode"])  # raises if it does not divide
    grace = worker(job)["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > ck.preempt_timeout, "SIGTERM must leave time to save a checkpoint"


def test_credentials_only_from_a_secret(job):
    env = container(job)["env"]
    secret_refs = [e for e in env if "valueFrom" in e]
    assert {e["name"] for e in secret_refs} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for e in env:
        if SECRET_NAMES.search(e["name"]):
            assert "value" not in e and set(e["valueFrom"]) == {"secretKeyRef"}, e
    assert not any(a.startswith("--storage_options") for a in trainer_flags(job))
    text = MANIFEST.read_text()
    literal_secret = r"(?i)secret_access_key\s*[:=]\s*(?!\"\$)\S"  # "$VAR" is the shell's
    for pattern in (r"AKIA[0-9A-Z]{16}", r"-----BEGIN", literal_secret, r"(?i)private_key",
                    r"(?i)\btoken\s*[:=]\s*\S"):
        assert not re.search(pattern, text), pattern
    assert "kind: Secret" not in text  # the Secret is created apart (docs/kubernetes.md)


def test_local_tier_on_a_node_local_volume(job):
    spec = worker(job)["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(job)["volumeMounts"]}
    local = parse_config(trainer_flags(job)).checkpoint.local_checkpoint_dir
    (mount,) = [p for p in mounts if local.startswith(p.rstrip("/") + "/")]
    assert "hostPath" in volumes[mounts[mount]], "the local tier outlives a pod on its node"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
