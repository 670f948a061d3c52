"""User mistakes found before any rank starts, each reported as one line (exit 2) rather than a traceback or a long
wait: an output_dir that cannot be written, a config file that does not parse, more CPU ranks than cores, a hub id
while the hub cannot be reached; and a Docker build context without the virtual environment and run outputs."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error, cli, write_config


# ------------------------------------------------------------------------------------------ an unwritable output_dir
@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody running the tests can write: mode 0555 for a normal user; for root (who ignores modes and
    for whom os.access says yes) the immutable attribute, which binds root too."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    else:
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("running as root, and this filesystem does not take chattr +i: no folder here is unwritable")
        undo = [chattr, "-i", str(folder)]
    try:
        try:
            (folder / "probe").mkdir()
        except OSError:
            pass
        else:
            pytest.skip(f"{folder} was made read-only but is still writable here (CAP_DAC_OVERRIDE?)")
        yield folder
    finally:
        subprocess.run(undo, check=True)  # else pytest cannot remove its temporary folder


@pytest.mark.parametrize("where", ["below", "itself", "under-a-file"])
def test_train_refuses_an_output_dir_it_cannot_write_before_any_rank_starts(synthetic_shards, read_only_folder,
                                                                            tmp_path, capsys, monkeypatch, where):
    """Before, the pre-flight passed and the ranks started, to die with a traceback at their first write."""
    import cogvx_dist.cli.train as train_cli

    launched: list[list[str]] = []
    monkeypatch.setattr(train_cli, "_launch", lambda command, *rest: launched.append(command) or 0)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    output = {"below": read_only_folder / "run", "itself": read_only_folder, "under-a-file": a_file / "run"}[where]
    model, shards = synthetic_shards((2, 1))
    config = write_config(tmp_path / "run.yaml", model, shards, output)
    code, _, err = cli(capsys, "train", "--config", str(config), "--nproc", "1")
    assert_one_line_error(code, err, f"output_dir {output}")
    assert launched == []
    assert sorted(p.name for p in read_only_folder.iterdir()) == []  # the check left nothing behind


# ------------------------------------------------------------------------------------------------ config syntax errors
@pytest.mark.parametrize("name, text, place, problem", [
    ("run.yaml", "model:\n  path: x\ndata: {shards: [a, b}\n", "3:21",
     "expected ',' or ']', but got '}' (while parsing a flow sequence at line 3, column 16)"),
    ("run.yml", "model:\n  path: x\n   dtype: float32\n", "3:9", "mapping values are not allowed here"),
    ("run.toml", '[model]\npath = "x"\ndtype = \n', "3:9", "Invalid value"),
])
def test_a_config_syntax_error_names_file_line_and_column_in_one_line(tmp_path, capsys, name, text, place, problem):
    """Before, a YAML error said only PyYAML's first line ("while parsing a flow sequence"), with no place."""
    config = tmp_path / name
    config.write_text(text)
    code, _, err = cli(capsys, "train", "--config", str(config))
    language = "TOML" if name.endswith(".toml") else "YAML"
    assert_one_line_error(code, err, f"{config}:{place}: {language} syntax error: {problem}")


# ------------------------------------------------------------------------------------------- more CPU ranks than cores
@pytest.mark.parametrize("nproc, gpus, cores, omp, expected", [
    (3, 0, 2, None, "--nproc 3 CPU ranks on 2 usable cores: ranks will share cores, each with 1 torch thread"),
    (3, 0, 2, "2", "--nproc 3 CPU ranks on 2 usable cores: ranks will share cores, each with 2 torch threads "
                   "(OMP_NUM_THREADS)"),
    (2, 0, 2, None, None),  # a rank per core
    (1, 0, 1, None, None),
    (8, 8, 2, None, None),  # GPU ranks: the cores only feed them
])
def test_more_cpu_ranks_than_cores_is_said_in_one_line(nproc, gpus, cores, omp, expected):
    """Before, cogvx train started the ranks without a word, and each step was slower than on fewer ranks."""
    from cogvx_dist.cli.train import core_sharing_warning

    warning = core_sharing_warning(nproc, gpus, cores, omp)
    if expected is None:
        assert warning is None
    else:
        assert warning is not None and "\n" not in warning and warning.startswith("cogvx train: WARNING: ")
        assert expected in warning


def test_train_says_it_before_launching_and_still_launches(synthetic_shards, tmp_path, capsys, monkeypatch):
    import cogvx_dist.cli.train as train_cli

    launched: list[list[str]] = []
    monkeypatch.setattr(train_cli, "_launch", lambda command, *rest: launched.append(command) or 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # one usable core
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    model, shards = synthetic_shards((2, 1))
    config = write_config(tmp_path / "run.yaml", model, shards, tmp_path / "out", train={"grad_accum_steps": 1})
    code, _, err = cli(capsys, "train", "--config", str(config), "--nproc", "2")
    assert code == 0 and len(launched) == 1 and launched[0][launched[0].index("--num_gpus") + 1] == "2"
    assert [line for line in err.splitlines() if "WARNING" in line] == [
        "cogvx train: WARNING: --nproc 2 CPU ranks on 1 usable core: ranks will share cores, each with 1 torch "
        "thread; starting anyway"]


# ---------------------------------------------------------------------------------------- a hub id, the hub unreachable
CLOSED_PORT = "http://127.0.0.1:9"
"""The discard port, closed on any test machine: a connection is refused at once, and the real hub is never asked."""


@pytest.fixture
def unreachable_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub pointed at a closed port, with an empty cache of its own (returned). Its constants are read
    when it is first imported, which other tests may have done already: they are set as well as the variables."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        CLOSED_PORT + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


def test_an_unreachable_hub_fails_fast_with_one_line(unreachable_hub, tmp_path, capsys, caplog):
    """Before, huggingface_hub retried 5 times with backoff: ~25 s and 11 warning lines, then the error."""
    import time

    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nmodel: {{path: nobody-here/no-such-model}}\n"
                      f"data: {{shards: {tmp_path / 'shards'}}}\n")
    started = time.monotonic()
    code, _, err = cli(capsys, "train", "--config", str(config), "--nproc", "1")
    took = time.monotonic() - started
    assert_one_line_error(code, err, "'nobody-here/no-such-model'", CLOSED_PORT, "cannot be reached")
    assert took < 5, f"took {took:.1f} s"
    assert [r.getMessage() for r in caplog.records if r.name.startswith("huggingface_hub") and r.levelname == "WARNING"
            ] == []  # each would be a line more on the user's terminal


@pytest.mark.parametrize("offline", [False, True])
def test_a_cached_hub_snapshot_still_loads_without_the_hub(unreachable_hub, tiny_checkpoint, monkeypatch, offline):
    import time

    from huggingface_hub import constants

    from cogvx_dist.core.loading import describe_checkpoint

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = unreachable_hub / "models--someone--cached-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit / "transformer"
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_checkpoint("CogVideoX-2b") / "transformer" / "config.json", snapshot / "config.json")
    started = time.monotonic()
    checkpoint = describe_checkpoint("someone/cached-model")
    assert checkpoint.family.name == "CogVideoX-2b"
    assert time.monotonic() - started < 5


# ------------------------------------------------------------------------------------------ the Docker build context
ARTIFACTS = (".venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so", ".venv/bin/python", "demo_out/run/x.pt",
             "runs/cogvx/checkpoints/step-00000004/lora/adapter.safetensors", ".pytest_cache/v/cache/nodeids",
             ".ruff_cache/0.6/123", "cogvx_dist.egg-info/PKG-INFO", "cogvx_dist/__pycache__/cli.cpython-311.pyc",
             "data_prep/sub/__pycache__/job.cpython-311.pyc", "cogvx_dist/core/loading.pyc", ".git/HEAD",
             "build/lib/cogvx_dist/__init__.py", "dist/cogvx_dist-0.1.0-py3-none-any.whl")
"""What a working checkout holds that `docker build .` must not send: the virtual environment (GBs), run outputs,
caches, bytecode, build outputs and git history."""


def _copied_sources() -> list[str]:
    """What the Dockerfile COPYs (or ADDs) from the build context, as test_dockerfile reads it with Docker's parser."""
    from tests.unit.test_dockerfile import instructions_of, stages

    return [source for stage in stages() for command in instructions_of("COPY", stage) + instructions_of("ADD", stage)
            if not any(flag.startswith("--from=") for flag in command.flags) for source in command.value[:-1]]


def _context(root: Path) -> set[str]:
    """The files and folders `docker build` sends from `root`, by docker-py's implementation of Docker's
    .dockerignore rules (it also keeps the Dockerfile whatever the patterns say, as Docker does)."""
    from docker.utils.build import exclude_paths

    ignore = root / ".dockerignore"
    patterns = [line.strip() for line in ignore.read_text().splitlines()] if ignore.is_file() else []
    return exclude_paths(str(root), [p for p in patterns if p and not p.startswith("#")])


def test_the_build_context_leaves_out_the_venv_run_outputs_and_caches_but_not_what_the_image_copies(tmp_path):
    """Before there was no .dockerignore: `docker build .` sent the 2 GB .venv, run outputs and caches."""
    from tests.helpers import REPO

    root = tmp_path / "checkout"
    needed = []
    for source in _copied_sources():  # the copied sources as they are in this checkout, without bytecode
        for path in [REPO / source, *(sorted((REPO / source).rglob("*")) if (REPO / source).is_dir() else [])]:
            relative = path.relative_to(REPO)
            if "__pycache__" in relative.parts or path.suffix == ".pyc":
                continue
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink():
                target.symlink_to(os.readlink(path))  # cogvx_dist/ds_configs -> ../ds_configs: the wheel needs it
            elif path.is_dir():
                target.mkdir(exist_ok=True)
            else:
                target.write_bytes(b"")
            needed.append(str(relative))
    for artifact in ARTIFACTS:
        (root / artifact).parent.mkdir(parents=True, exist_ok=True)
        (root / artifact).write_bytes(b"")
    if (REPO / ".dockerignore").is_file():
        shutil.copy(REPO / ".dockerignore", root / ".dockerignore")
    shutil.copy(REPO / "Dockerfile", root / "Dockerfile")
    sent = _context(root)
    assert {"cogvx_dist/ds_configs", "ds_configs/zero2.json", "launchers", "pyproject.toml"} <= set(needed)
    assert [path for path in needed if path not in sent] == []
    artifact_folders = {artifact.split("/")[0] for artifact in ARTIFACTS} - set(_copied_sources())
    assert sorted(path for path in sent if path in ARTIFACTS or path.split("/")[0] in artifact_folders
                  or "__pycache__" in path.split("/")) == []


def test_this_checkouts_build_context_is_small():
    from tests.helpers import REPO

    sent = _context(REPO)
    assert not [path for path in sent if path.split("/")[0] in (".venv", ".git")]
    size = sum((REPO / path).stat().st_size for path in sent if (REPO / path).is_file())
    assert size < 20 * 2**20, f"{size / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------- an output_dir that is not a run
def test_train_refuses_an_output_dir_holding_what_a_run_would_overwrite(synthetic_shards, tmp_path, capsys,
                                                                         monkeypatch):
    """A folder of the user's with a checkpoints/step-00000001/ and a metrics.jsonl of its own, but no run_config.json:
    before, the run used it, pruning deleted the user's step folder and metrics.jsonl was rewritten (exit 0)."""
    import cogvx_dist.cli.train as train_cli

    launched: list[list[str]] = []
    monkeypatch.setattr(train_cli, "_launch", lambda command, *rest: launched.append(command) or 0)
    output = tmp_path / "mine"
    (output / "checkpoints" / "step-00000001").mkdir(parents=True)
    (output / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    model, shards = synthetic_shards((2, 1))
    config = write_config(tmp_path / "run.yaml", model, shards, output)
    code, _, err = cli(capsys, "train", "--config", str(config), "--nproc", "1")
    assert_one_line_error(code, err, f"output_dir {output} is not a cogvx run folder")
    assert "checkpoints, metrics.jsonl" in err and launched == []
    assert (output / "checkpoints" / "step-00000001").is_dir()
    # A folder holding only the user's own notes and config, or a run's folder, is used as before.
    shutil.rmtree(output / "checkpoints")
    (output / "metrics.jsonl").unlink()
    (output / "run.yaml").write_text("notes\n")
    assert cli(capsys, "train", "--config", str(config), "--nproc", "1")[0] == 0 and len(launched) == 1
