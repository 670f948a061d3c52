"""What several test modules share: running cogvx (in-process or as a real process), run configs, traces, clips,
adapters and clean environments for multi-process runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
LORA = {"rank": 8, "alpha": 4.0}
"""The adapter the training tests use."""


# ---------------------------------------------------------------------------------------------------------- fixtures
def shared_folder(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], Any]) -> Path:
    """A folder made once for the whole test session, however many pytest-xdist workers ask for it: the first calls
    `make(folder)`, the others wait on a file lock and read what it made. A module-scoped fixture is made once per
    worker that runs one of its tests: a reference training run made up to three times on 2 cores. If `make` fails
    the folder is not marked done, so the next caller tries again (and fails alike)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's temp root, above each worker's own
    folder = root / "shared" / name
    done = folder.parent / f"{name}.done"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f"{name}.lock")):
        if not done.exists():
            if folder.exists():
                import shutil

                shutil.rmtree(folder)  # what a failed attempt left
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


# ---------------------------------------------------------------------------------------------------------- the CLI
def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m cogvx_dist ARGS` in a fresh process, capturing text output."""
    return subprocess.run([sys.executable, "-m", "cogvx_dist", *args], cwd=cwd or REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run `cogvx ARGS` in this process (the console script's own `main`): (exit code, stdout, stderr)."""
    from cogvx_dist.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """The CLI failed as it should for a user mistake: exit 2, one line on stderr holding every fragment."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def shard_keys(folder: Path | str) -> dict[str, list[str]]:
    """Sample keys of each shard of a dataset, in file order, as its sample index lists them."""
    from cogvx_dist.core.shard_format import Manifest
    from cogvx_dist.core.storage import Store

    manifest = Manifest.read(folder)
    index = manifest.sample_index(Store(folder))
    return {shard.name: index.keys_of(n) for n, shard in enumerate(manifest.shards)}


# ---------------------------------------------------------------------------------------------------------- training
def write_config(path: Path, model: Path, shards: Path, output: Path, **sections: Any) -> Path:
    """A run config of 8 steps (global batch 2 per rank), checkpoints every 4 steps, sample traces on."""
    config = {
        "output_dir": str(output),
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"shards": str(shards)},
        "lora": dict(LORA),
        "optim": {"lr": 2e-2, "warmup_steps": 2, "schedule": "cosine", "min_lr_ratio": 0.1},
        "train": {"max_steps": 8, "micro_batch_size": 1, "grad_accum_steps": 2, "seed": 5},
        "checkpoint": {"every_steps": 4, "keep_last": 2},
        "log": {"progress_bar": False, "sample_trace": True},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def short_run_config(folder: Path, model: Path, shards_dir: Path, **sections: Any) -> tuple[Path, Path]:
    """A 4-step run (global batch 4 on 2 ranks, 7 samples): (config path, output dir)."""
    output = folder / "run"
    defaults = {"train": {"max_steps": 4}, "checkpoint": {"every_steps": 2, "keep_last": 2},
                "log": {"progress_bar": False, "sample_trace": True, "tensorboard": False}}
    for section, values in sections.items():
        defaults.setdefault(section, {}).update(values)
    return write_config(folder / "run.yaml", model, shards_dir, output, **defaults), output


def launch(config: Path, nproc: int = 2, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`cogvx train --config CONFIG --nproc N` as a user runs it."""
    return run_cli("train", "--config", str(config), "--nproc", str(nproc), *overrides, env=env)


def summary_of(output: Path) -> dict[str, Any]:
    """A finished run's train_summary.json."""
    from cogvx_dist.core.run_folder import RunFolder

    return json.loads(RunFolder(output).summary.read_text())


def read_adapter(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of an exported adapter (state-dict names)."""
    from cogvx_dist.core.lora import load_exported_lora

    return load_exported_lora(folder).state


def shm_buffers(port: int) -> set[str]:
    """DeepSpeed CPU all-reduce buffers in /dev/shm of the single-node CPU run on master port `port` (one per
    rank; the name holds the port, so runs of concurrent tests do not mix)."""
    return {p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")}


def read_trace(output: Path) -> list[tuple[int, int, int, str]]:
    """(step, micro-step, rank, key) of every sample the ranks traced, sorted."""
    rows = []
    for path in sorted((output / "trace").glob("rank-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            record = json.loads(line)
            for key in record["keys"]:
                rows.append((record["step"], record["micro_step"], rank, key))
    return sorted(rows)


def micro_batches(output: Path) -> dict[tuple[int, int, int], list[str]]:
    """(step, micro-step, rank) -> the keys of that micro-batch, from the sample trace."""
    batches: dict[tuple[int, int, int], list[str]] = {}
    for step, micro, rank, key in read_trace(output):
        batches.setdefault((step, micro, rank), []).append(key)
    return batches


def assert_same_adapter(a: Path, b: Path) -> None:
    """The exported adapters of runs `a` and `b` hold the same tensors, bit for bit."""
    first, second = read_adapter(a / "lora"), read_adapter(b / "lora")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def stream_order(output: Path, dp_size: int) -> list[tuple[int, str]]:
    """(step, key) in global stream order: micro-step m of rank r reads position m * dp_size + r (micro batch 1)."""
    rows = read_trace(output)
    return [(step, key) for step, micro, rank, key in sorted(rows, key=lambda r: (r[0], r[1] * dp_size + r[2]))]


def evaluation_loss(model: Path, shards: Path, adapter: dict[str, torch.Tensor] | None) -> float:
    """Loss over every sample with fixed noise and timesteps; with `adapter`, the trained LoRA is applied."""
    from cogvx_dist.core.loading import describe_checkpoint, load_scheduler, load_transformer
    from cogvx_dist.core.lora import LoraSettings, inject_lora, lora_parameters
    from cogvx_dist.train.data.reader import BatchSplit, MicroBatches, ShardIndex
    from cogvx_dist.train.step.loss import LossContext, diffusion_loss

    info = describe_checkpoint(model)
    transformer = load_transformer(model)
    if adapter is not None:
        inject_lora(transformer, LoraSettings(**LORA), seed=0)
        params = lora_parameters(transformer)
        with torch.no_grad():
            for name, value in adapter.items():
                in_memory = name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
                params[in_memory].copy_(value)
    context = LossContext(info.family, info.transformer_config, load_scheduler(model))
    index = ShardIndex(shards)
    batches = MicroBatches(index, BatchSplit(1, 1, 0, 1), seed=0, start_position=0, steps=len(index))
    total = 0.0
    with torch.no_grad():
        for i in range(len(batches)):
            generator = torch.Generator().manual_seed(1000 + i)
            for _ in range(4):
                total += diffusion_loss(transformer, batches[i], context, generator, torch.device("cpu"),
                                        torch.float32).item()
    return total / (4 * len(batches))


# ---------------------------------------------------------------------------------------------------------- processes
def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """No launcher variables from the outer environment; one torch thread per process (2 cores)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "HOSTFILE",
                        "JOB_COMPLETION_INDEX", "NNODES", "GPUS_PER_NODE", "DRY_RUN", "CHECK")
           and not k.startswith(("PMI", "OMPI", "SLURM"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "PYTHONPATH": str(REPO), **extra})
    return env


MLFLOW_PYTHON = Path(sys.prefix) / "mlflow" / "bin" / "python"
"""The interpreter of the environment the MLflow tests use: this one plus mlflow (tests/mlflow_env.py says why)."""


def mlflow_python() -> Path:
    """MLFLOW_PYTHON, which `make setup` makes; a test that needs it fails without it (never skips)."""
    assert MLFLOW_PYTHON.exists(), f"no {MLFLOW_PYTHON}: `make setup` makes it (python tests/mlflow_env.py " \
                                   f"{MLFLOW_PYTHON.parents[1]})"
    return MLFLOW_PYTHON


def mlflow_importable() -> None:
    """Let this process import mlflow from MLFLOW_PYTHON's environment (processes it starts are not changed)."""
    from tests.mlflow_env import site_packages

    folder = str(site_packages(mlflow_python()))
    if folder not in sys.path:
        sys.path.append(folder)  # not site.addsitedir: its .pth file would add this environment's a second time


def communicate_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Outputs of processes started in their own sessions; on a timeout every group we started is killed."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        raise


# ---------------------------------------------------------------------------------------------------------- stores
def range_handler(folder: Path) -> type:
    """An http.server handler class serving a folder with single-range GET support (206 Partial Content), which
    Python's own SimpleHTTPRequestHandler lacks."""
    import http.server
    import io
    import re

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

        def send_head(self) -> Any:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            path = Path(self.translate_path(self.path))
            if not match or not path.is_file():
                return super().send_head()
            size = path.stat().st_size
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
            if start >= size:
                self.send_error(416)
                return None
            with open(path, "rb") as handle:
                handle.seek(start)
                body = handle.read(end - start + 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            return io.BytesIO(body)

    return Handler


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """A threaded HTTP server with Range support on loopback serving `folder`; yields its base URL."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), range_handler(folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}
"""What a real S3 client finds in the environment; moto's server accepts any."""


@contextlib.contextmanager
def s3_server(monkeypatch: pytest.MonkeyPatch | None = None) -> Iterator[dict[str, str]]:
    """An S3-compatible server (moto) on loopback; yields the environment a client needs (endpoint and test
    credentials), also set in this process when a monkeypatch is given."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    # moto keeps its buckets per process, not per server: start each server empty
    urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"))
    if monkeypatch is not None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
    try:
        yield env
    finally:
        server.stop()


def upload(folder: Path, url: str, env: dict[str, str]) -> None:
    """Copy a local folder's files to an s3:// URL (creating the bucket) with a plain S3 client."""
    import boto3

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}".lstrip("/"))


# ---------------------------------------------------------------------------------------------------------- results
def decode_mp4(path: Path) -> np.ndarray:
    """All frames of an mp4 as uint8 [F, H, W, 3], decoded with PyAV (what a user's player would show)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def transformer_output(transformer: torch.nn.Module, timestep: int = 400) -> torch.Tensor:
    """A tiny 2b transformer's prediction for fixed random inputs (to compare adapters by what they compute)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 3, 16, 4, 6, generator=generator)
    text = torch.randn(1, 226, 32, generator=generator)
    with torch.no_grad():
        return transformer(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([timestep])).sample


def make_adapter(model: Path, out_dir: Path, seed: int, strength: float = 0.5, family: str | None = None) -> Path:
    """Export a rank-4 LoRA whose B matrices are non-zero (a freshly injected one is an exact no-op)."""
    from cogvx_dist.core.loading import load_transformer
    from cogvx_dist.core.lora import LoraSettings, export_lora, inject_lora, lora_state_dict

    settings = LoraSettings(rank=4, alpha=4.0)
    transformer = load_transformer(model)
    inject_lora(transformer, settings, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=generator) * strength if ".lora_B." in k else v.clone())
             for k, v in lora_state_dict(transformer).items()}
    return export_lora(state, settings, out_dir, family)


def write_checkpoint(run: Path, model: Path, step: int, seed: int) -> Path:
    """A committed checkpoint folder as the trainer lays it out (lora/ + commit marker written last)."""
    from cogvx_dist.core.run_folder import RunFolder
    from cogvx_dist.train.checkpoints import commit

    folder = RunFolder(run).checkpoint(step)
    run_config = RunFolder(run).run_config
    if not run_config.exists():  # a run writes it before any checkpoint: the folder is a run's
        run_config.parent.mkdir(parents=True, exist_ok=True)
        run_config.write_text("{}\n")
    make_adapter(model, folder / "lora", seed)
    commit(folder, {"step": step})
    return folder


# ---------------------------------------------------------------------------------------------------------- faults
class Job:
    """`cogvx train` (or the DeepSpeed runner alone) as a real job in its own session, for fault tests: wait for a
    step, find its processes, signal them, and time how long the whole tree takes to end."""

    def __init__(self, config: Path, *overrides: str, nproc: int = 2, env: dict | None = None,
                 runner_only: bool = False, log: Path | None = None) -> None:
        import psutil  # DeepSpeed's dependency

        self.output = Path(yaml.safe_load(config.read_text())["output_dir"])
        command = [sys.executable, "-m", "cogvx_dist", "train", "--config", str(config), "--nproc", str(nproc),
                   *overrides]
        if runner_only:  # what `deepspeed --num_gpus N --module cogvx_dist.train` runs, without `cogvx train`
            command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
                       str(free_port()), "--module", "cogvx_dist.train", "--config", str(config), *overrides]
        self.log = log or self.output.parent / f"{self.output.name}-job.log"
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(command, cwd=REPO, env=clean_env(MASTER_ADDR="127.0.0.1", **(env or {})),
                                        stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self._psutil = psutil
        self.tree: list[Any] = []

    def wait_for_step(self, step: int, timeout: float = 300) -> None:
        """Wait until metrics.jsonl shows `step` (then remember the job's processes)."""
        import time

        deadline = time.monotonic() + timeout
        metrics = self.output / "metrics.jsonl"
        while time.monotonic() < deadline:
            if metrics.is_file() and any(json.loads(line)["step"] >= step for line in
                                         metrics.read_text().splitlines() if line.endswith("}")):
                self.tree = self._psutil.Process(self.process.pid).children(recursive=True)
                return
            assert self.process.poll() is None, f"job ended early ({self.process.returncode}): {self.output_text()}"
            time.sleep(0.1)
        raise AssertionError(f"step {step} not reached in {timeout} s: {self.output_text()}")

    def rank(self, local_rank: int) -> Any:
        return next(p for p in self.tree if f"--local_rank={local_rank}" in " ".join(p.cmdline()))

    def launcher(self) -> Any:
        return next(p for p in self.tree if "deepspeed.launcher.launch" in " ".join(p.cmdline()))

    def end(self, timeout: float = 180) -> tuple[int, float]:
        """(exit code of the job's first process, seconds until no process of the tree is left) from now."""
        import time

        started = time.monotonic()
        code = self.process.wait(timeout=timeout)
        tree = self.tree or []
        while any(p.is_running() and p.status() != self._psutil.STATUS_ZOMBIE for p in tree):
            assert time.monotonic() - started < timeout, f"processes outlived the job: {tree}"
            time.sleep(0.05)
        return code, time.monotonic() - started

    def output_text(self) -> str:
        return self.log.read_text() if self.log.is_file() else ""

    def kill(self) -> None:
        for process in [self._psutil.Process(self.process.pid), *self.tree]:
            try:
                process.kill()
            except self._psutil.NoSuchProcess:
                pass


def damaged_copy(shards: Path, folder: Path, how: str) -> tuple[Path, str, str]:
    """A copy of the dataset with one sample (the second of the first shard) damaged: (folder, shard, key)."""
    import shutil
    import tarfile

    from cogvx_dist.core import shard_format

    copy = folder / f"shards-{how}"
    shutil.copytree(shards, copy)
    entry = shard_format.Manifest.read(copy).shards[0]
    key = shard_keys(copy)[entry.name][1]
    path = copy / entry.name
    with tarfile.open(path) as tar:
        member = tar.getmember(f"{key}.{shard_format.TENSORS_EXT}")
    data = bytearray(path.read_bytes())
    if how == "header":  # the safetensors JSON header right after its 8-byte length
        data[member.offset_data + 8: member.offset_data + 24] = b"\x00not json at all"
    elif how == "flipped":  # one byte of tensor data near the member's end: it still decodes
        data[member.offset_data + member.size - 40] ^= 0xFF
    elif how == "truncated":
        del data[member.offset_data + 100:]
    path.write_bytes(bytes(data))
    return copy, entry.name, key


def record_fault_time(fault: str, seconds: float) -> None:
    """Append a measured time-to-exit to the file named by COGVX_FAULT_TIMES (for the fault table), if set."""
    path = os.environ.get("COGVX_FAULT_TIMES")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"fault": fault, "seconds": round(seconds, 2)}) + "\n")
