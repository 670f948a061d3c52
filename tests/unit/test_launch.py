"""Launchers without training: Kubernetes manifests validated against their schemas, shell launchers
syntax-checked and dry-run, hostfiles, and `cogvx launch check`. The real multi-node runs are in
tests/e2e/test_multinode.py."""

from __future__ import annotations

import copy
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cogvx_dist.cli import main as cogvx_main
from cogvx_dist.core.errors import CogvxError
from cogvx_dist.launch import parse_hostfile, select_hosts
from tests.helpers import REPO, clean_env, short_run_config

LAUNCHERS = REPO / "launchers"
K8S = LAUNCHERS / "k8s"
CRDS = REPO / "tests" / "assets" / "k8s-crds"
K8S_VERSION = "1.33.0"
SHELL_SCRIPTS = sorted(LAUNCHERS.rglob("*.sh")) + sorted(LAUNCHERS.rglob("*.sbatch"))
MANIFESTS = sorted(K8S.glob("*.yaml"))
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------------------------
# Shared inputs

@pytest.fixture(scope="module")
def shards(synthetic_shards) -> tuple[Path, Path]:
    return synthetic_shards((3, 2, 2))  # 7 samples


# ---------------------------------------------------------------------------------------------------------------
# Kubernetes manifests

def _strict(schema: Any) -> Any:
    """A CRD schema that rejects unknown fields, as the API server's pruning would drop them silently (the same
    idea as kubernetes-validate's strict mode): objects with `properties` get additionalProperties: false unless
    they preserve unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    result = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in result and "additionalProperties" not in result
            and not result.get("x-kubernetes-preserve-unknown-fields")):
        result["additionalProperties"] = False
    return result


@functools.lru_cache(maxsize=1)
def crd_validators() -> dict[tuple[str, str], jsonschema.Validator]:
    """(apiVersion, kind) -> a validator for each served version of the CRD schemas in tests/assets/k8s-crds."""
    import gzip

    validators = {}
    for path in sorted(CRDS.glob("*.schema.json.gz")):
        crd = json.loads(gzip.decompress(path.read_bytes()))
        for version in crd["versions"]:
            schema = _strict(version["openAPIV3Schema"])
            validators[(f"{crd['group']}/{version['name']}", crd["kind"])] = jsonschema.Draft7Validator(schema)
    assert validators, f"no CRD schemas in {CRDS}"
    return validators


def embedded_objects(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Core objects inside a custom resource, wrapped so kubernetes-validate checks them too (CRDs often leave the
    pod template loose)."""
    wrapped = []
    if doc["kind"] == "MPIJob":
        for role, spec in doc["spec"]["mpiReplicaSpecs"].items():
            wrapped.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()},
                            "template": spec["template"]})
    if doc["kind"] == "JobSet":
        for job in doc["spec"]["replicatedJobs"]:
            wrapped.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": job["name"]},
                            "spec": job["template"]["spec"]})
    return wrapped


def validate_manifest(doc: dict[str, Any], validators: dict[tuple[str, str], jsonschema.Validator]) -> None:
    """Raise if `doc` does not validate: CRD kinds against tests/assets/k8s-crds, core kinds with
    kubernetes-validate."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in validators:
        errors = sorted(validators[key].iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            raise jsonschema.ValidationError(f"{'/'.join(map(str, errors[0].path))}: {errors[0].message}")
        for inner in embedded_objects(doc):
            kubernetes_validate.validate(inner, K8S_VERSION, strict=True)
        return
    if key[0] and "/" in key[0] and not key[0].startswith(("batch/", "apps/")):
        raise AssertionError(f"no schema for {key} (add its CRD schema to tests/assets/k8s-crds)")
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_kubernetes_manifest_validates(path):
    validators = crd_validators()
    docs = load_docs(path)
    assert docs
    for doc in docs:
        validate_manifest(doc, validators)


def _pod_specs(node: Any) -> int:
    """How many pod specs (objects with a `containers` list) are in `node`."""
    if isinstance(node, dict):
        return isinstance(node.get("containers"), list) + sum(_pod_specs(value) for value in node.values())
    if isinstance(node, list):
        return sum(_pod_specs(value) for value in node)
    return 0


def test_no_manifest_and_no_pod_escapes_validation():
    """test_kubernetes_manifest_validates runs over MANIFESTS: every file under launchers/k8s must be one of them (a
    .yml, a .json or a subfolder would not be). The CRD schemas leave pod templates loose, so every pod spec in a
    custom resource must be inside an object embedded_objects hands to kubernetes-validate's strict check (a new
    CRD kind, or a new place for pods in one, needs its wrapper there); and every CRD schema kept in tests/assets is
    one a manifest uses."""
    assert sorted(p for p in K8S.rglob("*") if p.is_file()) == MANIFESTS
    validators = crd_validators()
    docs = [doc for path in MANIFESTS for doc in load_docs(path)]
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in validators:
            assert _pod_specs(embedded_objects(doc)) == _pod_specs(doc) > 0, doc["metadata"]["name"]
    assert {kind for _, kind in validators} == {doc["kind"] for doc in docs if (doc["apiVersion"], doc["kind"]) in
                                               validators}


def _doc(name: str, kind: str) -> dict[str, Any]:
    return next(d for d in load_docs(K8S / name) if d["kind"] == kind)


@pytest.mark.parametrize("name,kind,breaks", [
    ("train-mpijob.yaml", "MPIJob", lambda d: d["spec"].__setitem__("slotsPerWorker", "eight")),
    ("train-mpijob.yaml", "MPIJob", lambda d: d["spec"]["runPolicy"].__setitem__("backofLimit", 3)),  # typo
    ("train-mpijob.yaml", "MPIJob", lambda d: d["spec"].pop("mpiReplicaSpecs")),
    ("train-mpijob.yaml", "MPIJob",
     lambda d: d["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0].__setitem__("comand", [])),
    ("train-jobset.yaml", "JobSet", lambda d: d["spec"]["failurePolicy"].__setitem__("maxRestarts", "3")),
    ("train-jobset.yaml", "JobSet", lambda d: d["spec"]["replicatedJobs"][0].pop("name")),
    ("train-jobset.yaml", "JobSet",
     lambda d: d["spec"]["replicatedJobs"][0]["template"]["spec"].__setitem__("completions", "two")),
    ("prep-indexed-job.yaml", "Job", lambda d: d["spec"]["template"]["spec"].__setitem__("restartPolicy", 7)),
    ("prep-indexed-job.yaml", "Job", lambda d: d["spec"].__setitem__("completion", 8)),  # typo
    ("pvc.yaml", "PersistentVolumeClaim", lambda d: d["spec"].__setitem__("accesModes", ["ReadWriteMany"])),
    ("train-indexed-job.yaml", "Service", lambda d: d["spec"]["ports"][0].__setitem__("port", "http")),
])
def test_broken_manifest_fails_validation(name, kind, breaks):
    validators = crd_validators()
    doc = copy.deepcopy(_doc(name, kind))
    validate_manifest(copy.deepcopy(doc), validators)  # the original passes...
    breaks(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate_manifest(doc, validators)  # ...the broken copy does not


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_manifests_agree_with_each_other_and_resume():
    from cogvx_dist.core.config_files import from_dict
    from cogvx_dist.train.config import RunConfig

    # The ConfigMap's run config is a valid RunConfig and resumes by itself after a restart.
    run = yaml.safe_load(_doc("run-config.yaml", "ConfigMap")["data"]["run.yaml"])
    config = from_dict(RunConfig, run)
    config.validate()
    assert config.checkpoint.resume == "auto" and config.output_dir.startswith("/shared/")
    claim = _doc("pvc.yaml", "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]

    def pod_specs() -> list[tuple[str, dict[str, Any]]]:
        specs = [("prep", _doc("prep-indexed-job.yaml", "Job")["spec"]["template"]["spec"]),
                 ("idx", _doc("train-indexed-job.yaml", "Job")["spec"]["template"]["spec"])]
        mpi = _doc("train-mpijob.yaml", "MPIJob")["spec"]["mpiReplicaSpecs"]
        specs += [(f"mpi-{role}", s["template"]["spec"]) for role, s in mpi.items()]
        jobset = _doc("train-jobset.yaml", "JobSet")["spec"]["replicatedJobs"][0]["template"]["spec"]
        return specs + [("jobset", jobset["template"]["spec"])]

    for name, spec in pod_specs():
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [claim["metadata"]["name"]], name
        if name != "mpi-Launcher":
            assert "nvidia.com/gpu" in spec["containers"][0]["resources"]["limits"], name
        if name != "prep":  # training pods give the ranks time to checkpoint on SIGTERM
            assert spec["terminationGracePeriodSeconds"] >= config.checkpoint.preempt_grace_s + 10, name

    prep = _doc("prep-indexed-job.yaml", "Job")
    assert prep["spec"]["completionMode"] == "Indexed"
    assert int(_env(prep["spec"]["template"]["spec"]["containers"][0])["WORLD_SIZE"]) == prep["spec"]["completions"]

    mpijob = _doc("train-mpijob.yaml", "MPIJob")["spec"]
    launcher = mpijob["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    workers = mpijob["mpiReplicaSpecs"]["Worker"]
    assert mpijob["runPolicy"]["backoffLimit"] >= 1
    assert int(_env(launcher)["NP"]) == workers["replicas"] * mpijob["slotsPerWorker"]
    assert _env(launcher)["HOSTFILE"] == "/etc/mpi/hostfile" and "launchers/train_mpi.sh" in launcher["command"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == \
        mpijob["slotsPerWorker"]

    jobset = _doc("train-jobset.yaml", "JobSet")
    replicated = jobset["spec"]["replicatedJobs"][0]
    job = replicated["template"]["spec"]
    env = _env(job["template"]["spec"]["containers"][0])
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] >= 1 and job["backoffLimit"] == 0
    assert int(env["NNODES"]) == job["completions"] == job["parallelism"]
    # JobSet pod DNS: <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain = jobset name>
    name = jobset["metadata"]["name"]
    assert env["MASTER_ADDR"] == f"{name}-{replicated['name']}-0-0.{name}"

    indexed = _doc("train-indexed-job.yaml", "Job")
    service = _doc("train-indexed-job.yaml", "Service")
    env = _env(indexed["spec"]["template"]["spec"]["containers"][0])
    assert service["spec"]["clusterIP"] == "None"
    assert indexed["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": indexed["metadata"]["name"]}
    assert env["MASTER_ADDR"] == f"{indexed['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(env["NNODES"]) == indexed["spec"]["completions"]


# ---------------------------------------------------------------------------------------------------------------
# Shell launchers

@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=[str(p.relative_to(LAUNCHERS)) for p in SHELL_SCRIPTS])
def test_shell_script_parses_and_is_strict(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    if path.name != "common.sh":  # sourced, not run: the scripts that source it set the options
        assert "set -euo pipefail" in text
        assert os.access(path, os.X_OK) or path.suffix == ".sbatch", f"{path} is not executable"
    assert "/work/" not in text and "/home/" not in text  # no machine-specific paths


def dry_run(script: str, *args: str, fake_bin: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    full = clean_env(DRY_RUN="1", **env)
    if fake_bin is not None:
        full["PATH"] = f"{fake_bin}:{full['PATH']}"
    return subprocess.run(["bash", str(LAUNCHERS / script), *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=60)


def command_lines(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


@pytest.fixture
def fake_slurm(tmp_path) -> Path:
    """A `scontrol` that expands the job's node list the way Slurm does (for the fallbacks)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    scontrol = fake / "scontrol"
    scontrol.write_text("#!/usr/bin/env bash\n[[ \"$1 $2\" == 'show hostnames' ]] || exit 1\n"
                        "printf 'gpu-a\\ngpu-b\\n'; seq -f 'gpu-%g' 50000\n")  # long: a `| head` would SIGPIPE it
    scontrol.chmod(0o755)
    return fake


def test_train_node_dry_run_under_slurm(fake_slurm, tmp_path):
    result = dry_run("train_node.sh", "run.yaml", "train.max_steps=5", fake_bin=fake_slurm, TMPDIR=str(tmp_path),
                     SLURM_NODEID="1", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4", SLURM_JOB_NODELIST="gpu-[a-b]")
    assert result.returncode == 0, result.stderr
    assert "# hostfile" in result.stdout and "#   node-1 slots=4" in result.stdout
    check, launch = command_lines(result.stdout)
    assert check[:5] == [sys.executable, "-m", "cogvx_dist", "launch", "check"]
    hostfile = str(tmp_path / "cogvx-hostfile-2x4")
    assert launch == [sys.executable, "-m", "cogvx_dist", "train", "--config", "run.yaml", "--nproc", "4",
                      "--hostfile", hostfile, "--node-rank", "1", "--nnodes", "2", "--master-addr", "gpu-a",
                      "--master-port", "29500", "train.max_steps=5"]
    assert not Path(hostfile).exists(), "a dry run writes nothing"


def test_train_node_dry_run_under_kubernetes_and_errors(tmp_path):
    result = dry_run("train_node.sh", "/config/run.yaml", JOB_COMPLETION_INDEX="1", NNODES="2", GPUS_PER_NODE="8",
                     MASTER_ADDR="cogvx-train-node-0-0.cogvx-train", CHECK="0", TMPDIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    (launch,) = command_lines(result.stdout)
    assert launch[launch.index("--node-rank") + 1] == "1"
    assert launch[launch.index("--master-addr") + 1] == "cogvx-train-node-0-0.cogvx-train"

    missing = dry_run("train_node.sh", "run.yaml", NNODES="2", MASTER_ADDR="a")
    assert missing.returncode == 2 and "NODE_RANK is not set" in missing.stderr
    outside = dry_run("train_node.sh", "run.yaml", NODE_RANK="2", NNODES="2", MASTER_ADDR="a")
    assert outside.returncode == 2 and "not within 2 nodes" in outside.stderr


def test_launch_check_prints_the_commands_the_node_script_runs(shards, tmp_path):
    """`cogvx launch check --launcher no-ssh` and launchers/train_node.sh agree on every node's command."""
    config, _ = short_run_config(tmp_path, *shards)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=1\nnode-b slots=1  # second\n")
    result = subprocess.run([sys.executable, "-m", "cogvx_dist", "launch", "check", "--config", str(config),
                             "--hostfile", str(hostfile), "--launcher", "no-ssh", "--master-addr", "10.0.0.1",
                             "--nodes", "2", "--gpus-per-node", "1", "train.seed=7"],
                            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = command_lines(result.stdout.split("commands (no-ssh):\n", 1)[1])
    for node in (0, 1):
        script = dry_run("train_node.sh", str(config), "train.seed=7", NODE_RANK=str(node), HOSTFILE=str(hostfile),
                         MASTER_ADDR="10.0.0.1", GPUS_PER_NODE="1", CHECK="0")
        assert script.returncode == 0, script.stderr
        (command,) = command_lines(script.stdout)
        assert command[:3] == [sys.executable, "-m", "cogvx_dist"]  # the `cogvx` of the job's environment
        assert ["cogvx", *command[3:]] == printed[node]


def test_train_torchrun_dry_run():
    result = dry_run("train_torchrun.sh", "run.yaml", "train.max_steps=5", NNODES="2", GPUS_PER_NODE="4",
                     MASTER_ADDR="node0", RDZV_ID="job9", CHECK="0")
    assert result.returncode == 0, result.stderr
    assert command_lines(result.stdout) == [["torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--max-restarts",
                                             "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29500",
                                             "--rdzv-id", "job9", "--rdzv-conf", "join_timeout=600,last_call_timeout=5",
                                             "-m", "cogvx_dist.train", "--config", "run.yaml", "train.max_steps=5"]]


def test_train_torchrun_elastic_dry_run():
    """NNODES=MIN:MAX: the check is asked about the range (--elastic) and torchrun gets it with restarts."""
    result = dry_run("train_torchrun.sh", "run.yaml", NNODES="2:4", GPUS_PER_NODE="1", MASTER_ADDR="node0",
                     RDZV_ID="job9")
    assert result.returncode == 0, result.stderr
    check, launch = command_lines(result.stdout)
    assert check[check.index("--elastic") + 1] == "2:4" and check[check.index("--nodes") + 1] == "4"
    assert check[check.index("--launcher") + 1] == "torchrun"
    assert launch[:6] == ["torchrun", "--nnodes", "2:4", "--nproc-per-node", "1", "--max-restarts"]
    assert launch[6] == "3"
    bad = dry_run("train_torchrun.sh", "run.yaml", NNODES="2:x", CHECK="0")
    assert bad.returncode == 2 and "NNODES must be N or MIN:MAX, got '2:x'" in bad.stderr


def test_train_pdsh_dry_run(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 slots=8\nworker-2 slots=8\n")
    result = dry_run("train_pdsh.sh", "run.yaml", "train.max_steps=10", HOSTFILE=str(hostfile))
    assert result.returncode == 0, result.stderr
    check, launch = command_lines(result.stdout)
    assert "--launcher" in check and check[check.index("--launcher") + 1] == "pdsh"
    assert launch == ["deepspeed", "--hostfile", str(hostfile), "--master_addr", "worker-1", "--master_port", "29500",
                      "--module", "cogvx_dist.train", "--config", "run.yaml", "train.max_steps=10"]
    limited = dry_run("train_pdsh.sh", "run.yaml", HOSTFILE=str(hostfile), NNODES="1", GPUS_PER_NODE="2", CHECK="0")
    (launch,) = command_lines(limited.stdout)
    assert launch[3:7] == ["--num_nodes", "1", "--num_gpus", "2"]
    missing = dry_run("train_pdsh.sh", "run.yaml", HOSTFILE=str(tmp_path / "nope"))
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_mpi_dry_runs_for_both_mpi_flavours(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# operator-written style\nw-0.svc slots=2\nw-1.svc slots=1\n")
    openmpi = dry_run("train_mpi.sh", "run.yaml", HOSTFILE=str(hostfile), MPI_FLAVOR="openmpi", NCCL_DEBUG="WARN",
                      CHECK="0")
    assert openmpi.returncode == 0, openmpi.stderr
    (launch,) = command_lines(openmpi.stdout)
    assert launch[:5] == ["env", "MASTER_ADDR=w-0.svc", "MASTER_PORT=29500", "mpiexec", "-n"]
    assert launch[5] == "3" and launch[6:8] == ["--hostfile", str(hostfile)]
    assert ["-x", "NCCL_DEBUG"] == launch[launch.index("NCCL_DEBUG") - 1:launch.index("NCCL_DEBUG") + 1]
    assert launch[-4:] == ["-m", "cogvx_dist.train", "--config", "run.yaml"]

    mpich = dry_run("train_mpi.sh", "run.yaml", HOSTFILE=str(hostfile), MPI_FLAVOR="mpich", CHECK="0",
                    TMPDIR=str(tmp_path))
    assert mpich.returncode == 0, mpich.stderr
    assert "#   w-0.svc:2\n#   w-1.svc:1" in mpich.stdout  # Hydra's host:N form of the same hostfile
    (launch,) = command_lines(mpich.stdout)
    assert launch[launch.index("-f") + 1].startswith(str(tmp_path / "cogvx-hydra-hosts."))
    assert "-x" not in launch

    prep = dry_run("prep_mpi.sh", "--model", "m", "--data", "d", "--out", "o", NP="2", MPI_FLAVOR="mpich")
    assert prep.returncode == 0, prep.stderr
    assert command_lines(prep.stdout) == [["mpiexec", "-n", "2", sys.executable, "-m", "cogvx_dist", "prep", "--model",
                                           "m", "--data", "d", "--out", "o"]]


def test_the_hydra_hostfile_copy_is_removed_after_the_run(tmp_path):
    """MPICH's host:N copy of the hostfile lives as long as mpiexec, not longer."""
    hostfile, temp = tmp_path / "hostfile", tmp_path / "tmp"
    hostfile.write_text("w-0 slots=1\nw-1 slots=1\n")
    temp.mkdir()
    fake = tmp_path / "mpiexec"
    fake.write_text('#!/usr/bin/env bash\nwhile [[ $1 != -f ]]; do shift; done\ncat "$2"\n')
    fake.chmod(0o755)
    result = subprocess.run(["bash", str(LAUNCHERS / "train_mpi.sh"), "run.yaml"], capture_output=True, text=True,
                            env=clean_env(HOSTFILE=str(hostfile), MPI_FLAVOR="mpich", CHECK="0", MPIEXEC=str(fake),
                                          TMPDIR=str(temp)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "w-0:1\nw-1:1\n"  # mpiexec read the copy...
    assert list(temp.iterdir()) == []  # ...which is gone afterwards


def test_docs_and_launchers_use_current_variable_names():
    """torch reads TORCH_NCCL_ASYNC_ERROR_HANDLING; the old name is silently ignored."""
    import re

    texts = [p.read_text() for p in [*LAUNCHERS.rglob("*"), *(REPO / "docs").glob("*.md")] if p.is_file()]
    assert not any(re.search(r"(?<!TORCH_)NCCL_ASYNC_ERROR_HANDLING", text) is not None for text in texts)


def test_mpi_precheck_checks_the_world_mpiexec_starts(shards, tmp_path):
    """NP=2 with a 2+2-slot hostfile: mpiexec starts 2 ranks, so the precheck must check a world of 2, not 4."""
    config, _ = short_run_config(tmp_path, *shards)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("w-0 slots=2\nw-1 slots=2\n")
    result = dry_run("train_mpi.sh", str(config), HOSTFILE=str(hostfile), NP="2", MPI_FLAVOR="openmpi",
                     MASTER_ADDR="127.0.0.1")  # CHECK left on: the precheck command is printed
    assert result.returncode == 0, result.stderr
    check, launch = command_lines(result.stdout)
    assert check[:5] == [sys.executable, "-m", "cogvx_dist", "launch", "check"]
    assert launch[launch.index("-n") + 1] == "2"
    assert check[check.index("--world-size") + 1] == "2"
    ran = subprocess.run(check, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert "cogvx launch check: ok (1 nodes, 2 ranks, global batch 4, 7 samples)" in ran.stderr


def test_launch_check_world_size_fills_slots_in_order(shards, tmp_path, capsys):
    config, _ = short_run_config(tmp_path, *shards)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=1\nnode-b slots=2\n")
    args = ["--config", str(config), "--hostfile", str(hostfile), "--launcher", "mpi"]
    code, out, err = launch_check(capsys, *args, "--world-size", "2")
    assert code == 0, err
    assert "nodes: 2  ranks: 2  global batch: 4" in out and "node 1: node-b slots=1" in out
    assert f"mpiexec -n 2 --hostfile {hostfile} python" in out
    code, _, err = launch_check(capsys, *args, "--world-size", "4")
    assert code == 2 and "--world-size 4 but the hosts have only 3 slots" in err
    code, _, err = launch_check(capsys, "--config", str(config), "--hostfile", str(hostfile), "--world-size", "2")
    assert code == 2 and "--world-size is for --launcher mpi" in err


BAD_HOSTFILES = {
    "no-slots": "w-0 slots=2\nw-1\n",  # the awk readers took this as w-1:1 (Hydra) or refused it (slots)
    "zero-slots": "w-0 slots=2\nw-1 slots=0\n",
    "duplicate": "w-0 slots=2\nw-0 slots=2\n",
    "trailing-word": "w-0 slots=2 max_slots=4\n",
    "empty": "# nothing here\n",
}
SCRIPT_RUNS = {
    "train_mpi-mpich": ("train_mpi.sh", ["run.yaml"], {"MPI_FLAVOR": "mpich"}),
    "train_mpi-openmpi-np-set": ("train_mpi.sh", ["run.yaml"],
                                 {"MPI_FLAVOR": "openmpi", "NP": "2", "MASTER_ADDR": "10.0.0.1"}),
    "prep_mpi": ("prep_mpi.sh", ["--model", "m", "--out", "o"], {"MPI_FLAVOR": "mpich", "NP": "2"}),
    "train_pdsh": ("train_pdsh.sh", ["run.yaml"], {"MASTER_ADDR": "10.0.0.1"}),
    "train_node": ("train_node.sh", ["run.yaml"], {"NODE_RANK": "0", "NNODES": "1", "MASTER_ADDR": "10.0.0.1",
                                                   "GPUS_PER_NODE": "1"}),
}


@pytest.mark.parametrize("script", SCRIPT_RUNS)
@pytest.mark.parametrize("bad", BAD_HOSTFILES)
def test_scripts_reject_a_bad_hostfile_as_launch_check_does(tmp_path, capsys, script, bad):
    """The scripts read hostfiles through `cogvx launch hostfile`: a bad one fails there, with launch check's own
    message, even with CHECK=0 and every value the hostfile would provide already set."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(BAD_HOSTFILES[bad])
    code, out, err = launch_check(capsys, "--config", "run.yaml", "--hostfile", str(hostfile), "--launcher", "mpi")
    assert code == 2 and out == ""
    (message,) = err.strip().splitlines()
    name, args, env = SCRIPT_RUNS[script]
    result = dry_run(name, *args, HOSTFILE=str(hostfile), CHECK="0", TMPDIR=str(tmp_path), **env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr.splitlines(), result.stderr
    assert command_lines(result.stdout) == [], "nothing is launched"


def test_hostfile_formats_the_scripts_read(tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# operator-written style\nw-0.svc slots=2\nw-1.svc slots=1  # last\n")
    expected = {"hosts": "w-0.svc\nw-1.svc\n", "slots": "3\n", "hydra": "w-0.svc:2\nw-1.svc:1\n",
                "table": "w-0.svc 2\nw-1.svc 1\ntotal 3\n"}
    for form, text in expected.items():
        assert cogvx_main(["launch", "hostfile", str(hostfile), "--format", form]) == 0
        assert capsys.readouterr().out == text, form


def test_slurm_batch_scripts_dry_run(fake_slurm):
    train = dry_run("slurm/train.sbatch", "run.yaml", "train.max_steps=3", fake_bin=fake_slurm, COGVX_REPO=str(REPO),
                    SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_ID="123", SLURM_NNODES="2")
    assert train.returncode == 0, train.stderr
    assert "master gpu-a:20123" in train.stderr
    assert command_lines(train.stdout) == [["srun", "--label", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash",
                                            str(LAUNCHERS / "train_node.sh"), "run.yaml", "train.max_steps=3"]]
    prep = dry_run("slurm/prep.sbatch", "--model", "m", "--out", "o", COGVX_REPO=str(REPO), SLURM_NTASKS="8")
    assert prep.returncode == 0, prep.stderr
    (srun,) = command_lines(prep.stdout)
    assert srun[:5] == ["srun", "--label", "--kill-on-bad-exit=1", "bash", "-c"]
    assert "RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS" in srun[5]
    assert srun[6:] == [sys.executable, "--model", "m", "--out", "o"]
    # The per-task shell really hands the flags to `cogvx prep` with the task's rank.
    echoed = subprocess.run(["bash", "-c", srun[5].replace('exec "$0"', 'echo "$0"'), "python3", "--out", "o"],
                            env={"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                                 "PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert echoed.stdout.split() == ["python3", "-m", "cogvx_dist", "prep", "--out", "o"]


def test_slurm_preemption_notice_reaches_the_step_and_requeues(fake_slurm, tmp_path):
    """Slurm's --signal=B:USR1 notice goes to the batch script: it must pass it to the job step and, when the step
    exits 75 (checkpoint committed), requeue the job. A fake srun plays a step that checkpoints on SIGUSR1."""
    import time

    srun, scontrol = fake_slurm / "srun", fake_slurm / "scontrol"
    srun.write_text("#!/usr/bin/env bash\ntrap 'echo step got USR1 >&2; exit 75' USR1\n"
                    "echo \"$1 PYTHONFAULTHANDLER=$PYTHONFAULTHANDLER NCCL_DEBUG=$NCCL_DEBUG\" > \"$STARTED\"\n"
                    "while true; do sleep 0.1; done\n")
    srun.chmod(0o755)
    calls = tmp_path / "scontrol.calls"
    scontrol.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n[[ \"$1 $2\" == 'show hostnames' ]] && "
                        "printf 'gpu-a\\ngpu-b\\n'\nexit 0\n")
    started = tmp_path / "started"
    env = clean_env(PATH=f"{fake_slurm}:{os.environ['PATH']}", COGVX_REPO=str(REPO), SLURM_JOB_NODELIST="gpu-[a-b]",
                    SLURM_JOB_ID="77", SLURM_NNODES="2", STARTED=str(started))
    job = subprocess.Popen(["bash", str(LAUNCHERS / "slurm" / "train.sbatch"), "run.yaml"], env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    _, err = job.communicate(timeout=30)
    assert job.returncode == 75, err
    assert "step got USR1" in err and "requeueing job 77" in err
    assert "requeue 77" in calls.read_text()
    # Each node's lines are labelled; crashes print Python stacks; NCCL says what goes wrong without INFO noise.
    assert started.read_text().split() == ["--label", "PYTHONFAULTHANDLER=1", "NCCL_DEBUG=WARN"]


# ---------------------------------------------------------------------------------------------------------------
# cogvx launch check

def test_parse_hostfile_formats_and_line_numbered_errors():
    hosts = parse_hostfile("# comment\n\nnode-a slots=8\n  node-b   slots=4   # trailing comment\n")
    assert [(h.name, h.slots) for h in hosts] == [("node-a", 8), ("node-b", 4)]
    assert [(h.name, h.slots) for h in select_hosts(hosts, 1, 2)] == [("node-a", 2)]
    for text, message in [("a slots=2\nb slots=two\n", "line 2: expected"),
                          ("a slots=2\n\na slots=1\n", "line 3: host a is already listed on line 1"),
                          ("a slots=0\n", "line 1: a has slots=0"),
                          ("a 8\n", "line 1: expected"),
                          ("# only comments\n", "no hosts")]:
        with pytest.raises(CogvxError, match=message):
            parse_hostfile(text)
    with pytest.raises(CogvxError, match="--nodes 3 but the hostfile lists only 2 hosts"):
        select_hosts(hosts, 3, None)


def test_a_hostfile_that_is_not_utf8_is_one_line(tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_bytes(b"node-a slots=2\nn\xf6de-b slots=2\n")
    code = cogvx_main(["launch", "hostfile", str(hostfile)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and f"hostfile {hostfile} line 2: not UTF-8 text (byte 0xf6)" in lines[0]


def launch_check(capsys, *args: str) -> tuple[int, str, str]:
    code = cogvx_main(["launch", "check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_launch_check_good_plan(shards, tmp_path, capsys):
    config, _ = short_run_config(tmp_path, *shards)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    code, out, err = launch_check(capsys, "--config", str(config), "--hostfile", str(hostfile))
    assert code == 0, err
    assert "nodes: 2  ranks: 2  global batch: 4  samples: 7" in out
    assert "note: 4 steps x 4 samples = 2.29 passes over the data" in out
    assert out.rstrip().endswith(f"deepspeed --hostfile {hostfile} --master_addr node-a --master_port 29500 "
                                 f"--module cogvx_dist.train --config {config}")
    code, out, _ = launch_check(capsys, "--config", str(config), "--nodes", "2", "--launcher", "mpi",
                                "--master-addr", "127.0.0.1")
    assert code == 0
    assert f"env MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 mpiexec -n 2 python -m cogvx_dist.train --config {config}" \
        in out
    code, out, _ = launch_check(capsys, "--config", str(config), "--nodes", "2", "--launcher", "slurm")
    assert f"sbatch --nodes=2 --gpus-per-node=1 launchers/slurm/train.sbatch {config}" in out


def test_launch_check_reports_resume_point(shards, tmp_path, capsys):
    from cogvx_dist.core.run_folder import COMMIT_MARKER, RunFolder

    config, output = short_run_config(tmp_path, *shards)
    folder = RunFolder(output).checkpoint(2)
    folder.mkdir(parents=True)
    RunFolder(output).run_config.write_text("{}\n")  # a run's folder: it writes this before any checkpoint
    (folder / COMMIT_MARKER).write_text(json.dumps({"step": 2, "position": 8, "world_size": 2}))
    code, out, err = launch_check(capsys, "--config", str(config), "--nodes", "2", "--launcher", "no-ssh")
    assert code == 0, err
    assert f"note: resumes from {folder}" in out


def test_launch_check_counts_data_parallel_ranks_with_sequence_parallelism(shards, tmp_path, capsys):
    config, _ = short_run_config(tmp_path, *shards)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    args = ["--config", str(config), "--hostfile", str(hostfile), "--launcher", "no-ssh"]
    code, out, err = launch_check(capsys, *args, "parallel.sequence_parallel=2")
    assert code == 0, err
    assert "ranks: 4  global batch: 4" in out  # micro batch 1 x 2 accumulation steps x 2 data-parallel ranks
    assert "sequence-parallel groups of 2 ranks: 2 data-parallel ranks" in out and "WARNING" not in out
    hostfile.write_text("node-a slots=3\nnode-b slots=1\n")
    code, out, err = launch_check(capsys, *args, "parallel.sequence_parallel=2")
    assert code == 0, err
    assert "does not divide the slots of node-a, node-b: some groups span nodes" in out
    code, out, err = launch_check(capsys, *args)
    assert code == 2 and "fewer than one global batch of 8" in err  # 4 data-parallel ranks; the shards hold 7


@pytest.mark.parametrize("setup,message", [
    ("bad-hostfile", "line 2: expected \"HOSTNAME slots=N\", got 'node-b slots=x'"),
    ("too-few-samples", "data.shards has 7 samples, fewer than one global batch of 8"),
    ("indivisible", "train.global_batch_size=5 is not micro_batch_size (1) x 2 data-parallel ranks x a whole number "
                    "of grad_accum_steps"),
    ("missing-shards", "data.shards"),
    ("bad-deepspeed-env", "line 2: '# tuning' is not NAME=VALUE"),
    ("no-cluster", "give --hostfile, or --nodes"),
    ("bad-ds-config", "deepspeed.config 'zero9': no such file"),
    ("sequence-parallel-indivisible", "parallel.sequence_parallel 4 does not divide the 2 ranks"),
    ("sequence-parallel-compiled", "model.compile: blocks does not go with parallel.sequence_parallel > 1"),
])
def test_launch_check_errors_are_one_line(shards, tmp_path, capsys, monkeypatch, setup, message):
    config, _ = short_run_config(tmp_path, *shards)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    args = ["--config", str(config), "--hostfile", str(hostfile)]
    if setup == "bad-hostfile":
        hostfile.write_text("node-a slots=1\nnode-b slots=x\n")
    elif setup == "too-few-samples":
        args += ["--gpus-per-node", "2"]
    elif setup == "indivisible":
        args += ["train.global_batch_size=5"]
    elif setup == "missing-shards":
        args += [f"data.shards={tmp_path / 'nowhere'}"]
    elif setup == "bad-deepspeed-env":
        monkeypatch.chdir(tmp_path)
        (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=WARN\n# tuning\nNCCL_IB_DISABLE=1\n")
    elif setup == "no-cluster":
        args = ["--config", str(config)]
    elif setup == "bad-ds-config":
        args += ["deepspeed.config=zero9"]
    elif setup == "sequence-parallel-indivisible":
        args += ["parallel.sequence_parallel=4"]
    elif setup == "sequence-parallel-compiled":
        args += ["parallel.sequence_parallel=2", "model.compile=blocks"]
    code, out, err = launch_check(capsys, *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cogvx launch: error: ") and message in lines[0], err


def test_deepspeed_env_example_is_what_deepspeed_accepts():
    """The example must survive DeepSpeed's line parser (no comments, no blank lines) once copied."""
    from cogvx_dist.launch import check_deepspeed_env

    names = check_deepspeed_env(LAUNCHERS / "deepspeed_env.example")
    assert "NCCL_SOCKET_IFNAME" in names and len(names) == len(set(names))
    hosts = parse_hostfile((LAUNCHERS / "hostfile.example").read_text())
    assert len(hosts) == 2 and all(h.slots == 8 for h in hosts)


def test_launch_check_refuses_an_elastic_range_that_cannot_keep_the_global_batch(shards, tmp_path, capsys):
    """The pre-flight of an elastic job: at 4 nodes x 1 rank no whole accumulation gives 6 samples a step, so
    2:4 is refused in one line that says which ranges work; 2:3 passes and torchrun gets the range."""
    config, _ = short_run_config(tmp_path, *shards)
    args = ["--config", str(config), "--launcher", "torchrun", "train.global_batch_size=6"]
    code, out, err = launch_check(capsys, *args, "--nodes", "4", "--elastic", "2:4")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "" and len(lines) == 1
    assert ("elastic node range 2:4: train.global_batch_size 6 cannot be kept at 4 node(s) x 1 ranks "
            "(micro_batch_size 1); node ranges that keep it: 1:3, 6:6") in lines[0]
    code, out, err = launch_check(capsys, *args, "--nodes", "3", "--elastic", "2:3", "--max-restarts", "5")
    assert code == 0, err
    assert "nodes: 3  ranks: 3  global batch: 6" in out
    assert "note: grad_accum_steps 2 here: it follows train.global_batch_size 6 at every world size" in out
    assert "torchrun --nnodes 2:3 --nproc-per-node 1 --max-restarts 5 --rdzv-backend c10d" in out
    code, _, err = launch_check(capsys, "--config", str(config), "--nodes", "3", "--elastic", "2:3")
    assert code == 2 and "elastic node range 2:3 needs train.global_batch_size" in err
    code, _, err = launch_check(capsys, *args, "--nodes", "3", "--elastic", "3:2")
    assert code == 2 and "expected MIN:MAX with 1 <= MIN <= MAX" in err


def test_slurm_elastic_batch_script_dry_run(fake_slurm):
    """The elastic recipe keeps the job through a node failure (--no-kill, no kill-on-bad-exit) and hands torchrun
    the range from one node fewer than the allocation up to all of it."""
    script = LAUNCHERS / "slurm" / "train-elastic.sbatch"
    directives = [line.split()[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--no-kill" in directives and "--requeue" in directives
    train = dry_run("slurm/train-elastic.sbatch", "run.yaml", fake_bin=fake_slurm, COGVX_REPO=str(REPO),
                    SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_ID="123", SLURM_NNODES="4", CHECK="0")
    assert train.returncode == 0, train.stderr
    assert "3:4 nodes (elastic), rendezvous gpu-a:20123" in train.stderr
    assert command_lines(train.stdout) == [["srun", "--label", "--ntasks-per-node=1", "--no-kill",
                                            "--kill-on-bad-exit=0", "bash", str(LAUNCHERS / "train_torchrun.sh"),
                                            "run.yaml"]]
    # What each task then runs: the torchrun launcher with the range and the job's rendezvous.
    task = dry_run("train_torchrun.sh", "run.yaml", NNODES="3:4", MASTER_ADDR="gpu-a", MASTER_PORT="20123",
                   RDZV_ID="123", GPUS_PER_NODE="8", CHECK="0")
    (launch,) = command_lines(task.stdout)
    assert launch[launch.index("--nnodes") + 1] == "3:4" and launch[launch.index("--rdzv-id") + 1] == "123"


def test_elastic_jobset_keeps_its_batch_over_its_node_range():
    """The elastic JobSet: torchrun's range ends at the Job's pod count, a lost pod is recreated alone (per-index
    backoff, pods never restarted in place), and the run config it passes keeps the global batch at every node count
    of the range (what train_torchrun.sh's pre-flight would otherwise refuse)."""
    from cogvx_dist.core.config_files import from_dict
    from cogvx_dist.train.config import RunConfig
    from cogvx_dist.train.preflight import check_elastic_range

    job = _doc("train-elastic-jobset.yaml", "JobSet")["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = job["template"]["spec"]
    container = pod["containers"][0]
    env = _env(container)
    low, high = map(int, env["NNODES"].split(":"))
    assert high == job["completions"] == job["parallelism"] and low < high
    assert job["backoffLimitPerIndex"] >= 1 and pod["restartPolicy"] == "Never"
    assert container["command"][:2] == ["bash", "launchers/train_torchrun.sh"]
    assert env["MASTER_ADDR"].startswith("cogvx-train-elastic-node-0-0.")
    run = yaml.safe_load(_doc("run-config.yaml", "ConfigMap")["data"]["run.yaml"])
    config = from_dict(RunConfig, run)
    for override in container["command"][3:]:
        dotted, value = override.split("=")
        section, key = dotted.split(".")
        setattr(getattr(config, section), key, type(getattr(getattr(config, section), key))(value))
    config.validate()
    check_elastic_range(config, low, high, int(env["GPUS_PER_NODE"]))
    assert config.checkpoint.every_minutes > 0
