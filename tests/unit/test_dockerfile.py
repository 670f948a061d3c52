"""The container recipe the Kubernetes manifests name, read by Docker's own Dockerfile parser (BuildKit's, through the
PyPI package `dockerfile`): every instruction is one Docker knows, each stage declares the variables it uses, the
files it copies are in the repository, it runs as a non-root user, puts the launchers where the manifests look for
them, installs the project from its wheel and declares a command the project installs. (Building it needs Docker and
a CUDA base image; the wheel install itself runs in tests/e2e/test_wheel_install.py.)"""

from __future__ import annotations

import re
import shlex
import tomllib

import dockerfile
import yaml

from tests.helpers import REPO

DOCKERFILE = REPO / "Dockerfile"
COMMANDS: tuple[dockerfile.Command, ...] = dockerfile.parse_file(str(DOCKERFILE))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
KNOWN = {name.upper() for name in dockerfile.all_cmds()}
# Variables every image's environment has, used before a stage could declare them (ENV PATH=/opt/venv/bin:$PATH).
BASE_ENV = {"PATH", "HOME", "HOSTNAME"}
VARIABLE = re.compile(r"\$\{?([A-Za-z_]\w*)\}?")  # $NAME or ${NAME}


def instruction(command: dockerfile.Command) -> str:
    return command.cmd.upper()


def stages() -> list[list[dockerfile.Command]]:
    """The build stages, each from its FROM on."""
    starts = [i for i, c in enumerate(COMMANDS) if instruction(c) == "FROM"]
    return [list(COMMANDS[a:b]) for a, b in zip(starts, starts[1:] + [len(COMMANDS)])]


def final_stage() -> list[dockerfile.Command]:
    return stages()[-1]


def declared_args(command: dockerfile.Command) -> dict[str, str | None]:
    """NAME -> default (None without one) of an ARG instruction."""
    pairs = (item.partition("=") for item in command.value)
    return {name: (default.strip('"') if eq else None) for name, eq, default in pairs}


def global_args() -> dict[str, str | None]:
    """The ARGs before the first FROM: the only variables a FROM line can use."""
    found: dict[str, str | None] = {}
    for command in COMMANDS[:COMMANDS.index(stages()[0][0])]:
        found.update(declared_args(command))
    return found


def base_images() -> list[str]:
    """Each stage's base image with the global ARG defaults substituted (what `docker build .` pulls)."""
    defaults = global_args()
    return [VARIABLE.sub(lambda m: defaults.get(m[1]) or m[0], stage[0].value[0]) for stage in stages()]


def instructions_of(word: str, commands: list[dockerfile.Command]) -> list[dockerfile.Command]:
    return [c for c in commands if instruction(c) == word]


def test_every_instruction_is_one_docker_knows():
    assert "FORM" not in KNOWN and instruction(dockerfile.parse_string("FORM x\n")[0]) == "FORM"  # the check bites
    assert [c.original for c in COMMANDS if instruction(c) not in KNOWN] == []
    before_first_from = COMMANDS[:COMMANDS.index(stages()[0][0])]
    assert {instruction(c) for c in before_first_from} <= {"ARG"}  # Docker allows only ARG before the first FROM


def test_every_variable_a_stage_uses_is_declared_where_docker_sees_it():
    """A FROM sees only the global ARGs, with defaults (else the build needs --build-arg); a stage sees only the
    ARGs it re-declares and the ENVs it sets: `${TORCH_SPEC}` in a stage without `ARG TORCH_SPEC` is empty, and
    `pip install --index-url ...` then installs no torch."""
    for image in base_images():
        assert "$" not in image, f"FROM {image}: a variable without a global ARG default"
    for stage in stages():
        known = set(BASE_ENV)
        for command in stage[1:]:
            word = instruction(command)
            if word == "ARG":
                known |= set(declared_args(command))
                continue
            values = command.value[1::2] if word == "ENV" else command.value
            used = {name for value in values for name in VARIABLE.findall(value)}
            assert used <= known, f"line {command.start_line}: {command.original} uses {used - known}"
            if word == "ENV":
                known |= set(command.value[::2])


def test_the_image_runs_as_a_non_root_user():
    users = [c.value[0] for c in instructions_of("USER", final_stage())]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert any(f"--uid {users[-1]}" in c.value[0] for c in instructions_of("RUN", final_stage()))


def test_the_manifests_find_the_launchers_and_the_image_where_the_recipe_puts_them():
    workdir = instructions_of("WORKDIR", final_stage())[-1].value[0]
    assert ("launchers", "launchers") in [c.value for c in instructions_of("COPY", final_stage())]
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


def test_what_the_recipe_copies_is_in_the_repository_or_an_earlier_stage():
    aliases: list[str] = []
    for stage in stages():
        for command in instructions_of("COPY", stage) + instructions_of("ADD", stage):
            source_stage = [flag.split("=", 1)[1] for flag in command.flags if flag.startswith("--from=")]
            if source_stage:
                assert source_stage[0] in aliases, f"line {command.start_line}: no earlier stage {source_stage[0]}"
                continue
            for source in command.value[:-1]:
                assert (REPO / source).exists(), f"line {command.start_line}: {source} is not in the repository"
        if len(stage[0].value) == 3 and stage[0].value[1].upper() == "AS":
            aliases.append(stage[0].value[2])


def test_the_project_goes_in_as_its_wheel_with_the_sources_the_wheel_needs():
    wheel_stage = next(stage for stage in stages()
                       if any("pip wheel --no-deps" in c.value[0] for c in instructions_of("RUN", stage)))
    copied = {source for c in instructions_of("COPY", wheel_stage) if not c.flags for source in c.value[:-1]}
    needs = {"pyproject.toml", PYPROJECT["project"]["readme"], "ds_configs"}  # cogvx_dist/ds_configs links to it
    needs |= {package.rstrip("*") for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needs <= copied
    runs = " ".join(c.value[0] for c in instructions_of("RUN", final_stage()))
    assert "pip install --no-cache-dir /wheels/*.whl" in runs
    assert any("--from=wheel" in c.flags for c in instructions_of("COPY", final_stage()))


def test_the_declared_command_exists_and_torch_matches_the_project():
    launch = (instructions_of("ENTRYPOINT", final_stage()) or instructions_of("CMD", final_stage()))[-1]
    program = launch.value[0] if launch.json else shlex.split(launch.value[0])[0]
    assert program in PYPROJECT["project"]["scripts"], launch.original
    torch_arg = global_args()["TORCH_SPEC"]
    assert re.fullmatch(r"torch==[\d.]+", torch_arg), torch_arg
    assert f"TORCH_SPEC ?= {torch_arg}" in (REPO / "Makefile").read_text()
