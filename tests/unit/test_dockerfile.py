"""The container recipe the Kubernetes manifests name: it parses, runs as a non-root user, puts the launchers where
the manifests look for them, installs the project from its wheel and declares entry points that exist. (Building
it needs Docker and a CUDA base image; the wheel install itself runs in tests/e2e/test_wheel_install.py.)"""

from __future__ import annotations

import re
import shlex

import tomllib
import yaml

from tests.helpers import REPO

DOCKERFILE = REPO / "Dockerfile"
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "CMD", "ENTRYPOINT", "LABEL", "EXPOSE"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, parsed = "", []
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        joined += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = joined.partition(" ")
            parsed.append((word.upper(), rest.strip()))
            joined = ""
    assert joined == "", "a continuation line runs off the end"
    return parsed


def final_stage() -> list[tuple[str, str]]:
    parsed = instructions()
    last_from = max(i for i, (word, _) in enumerate(parsed) if word == "FROM")
    return parsed[last_from:]


def test_every_instruction_is_known():
    unknown = [word for word, _ in instructions() if word not in INSTRUCTIONS]
    assert unknown == [] and instructions()[0][0] in ("ARG", "FROM")


def test_the_image_runs_as_a_non_root_user():
    users = [args for word, args in final_stage() if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert any(f"--uid {users[-1]}" in args for word, args in final_stage() if word == "RUN")


def test_the_manifests_find_the_launchers_and_the_image_where_the_recipe_puts_them():
    workdir = [args for word, args in final_stage() if word == "WORKDIR"][-1]
    assert ("COPY", "launchers launchers") in final_stage()
    image = re.search(r"docker build -t (\S+) \.", DOCKERFILE.read_text()).group(1)
    for path in sorted((REPO / "launchers" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for container in _containers(doc):
                assert container["image"] == image, path.name
                assert container["workingDir"] == workdir, path.name
                command = container.get("command", [])
                if command[:1] == ["bash"]:
                    assert (REPO / command[1]).is_file(), (path.name, command)
                if command[:1] == ["/usr/sbin/sshd"]:  # MPIJob workers: sshd as the image's user
                    config = command[command.index("-f") + 1]
                    assert config in DOCKERFILE.read_text(), config


def _containers(node: object) -> list[dict]:
    if isinstance(node, dict):
        found = list(node.get("containers", [])) if isinstance(node.get("containers"), list) else []
        return found + [c for value in node.values() for c in _containers(value)]
    if isinstance(node, list):
        return [c for value in node for c in _containers(value)]
    return []


def test_the_project_goes_in_as_its_wheel_with_the_sources_the_wheel_needs():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied = [args.split()[0] for word, args in instructions() if word == "COPY" and "--from" not in args]
    for package in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied, package
    assert "ds_configs" in copied  # cogvx_dist/ds_configs links to it
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    assert "pip wheel --no-deps" in runs and "pip install --no-cache-dir /wheels/*.whl" in runs


def test_the_declared_command_exists_and_torch_matches_the_project():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    command = [args for word, args in final_stage() if word == "CMD"][-1]
    assert shlex.split(command.strip("[]").replace(",", " "))[0].strip('"') in pyproject["project"]["scripts"]
    torch_arg = re.search(r'ARG TORCH_SPEC="?(torch==[\d.]+)', DOCKERFILE.read_text()).group(1)
    assert f"TORCH_SPEC ?= {torch_arg}" in (REPO / "Makefile").read_text()
