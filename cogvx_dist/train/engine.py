"""Everything that talks to DeepSpeed: process-group start, DeepSpeed-config resolution, the engine, checkpoints,
collectives and ZeRO-3 gathering. No other module imports deepspeed.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cogvx_dist.core.errors import CogvxError, RankError
from cogvx_dist.core.launch_env import under_mpi

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
"""The repository's ds_configs/ (shipped beside the package in a source checkout)."""


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of ranks (all data-parallel)."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    device: torch.device
    """This rank's device."""

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0


def init_distributed() -> RankInfo:
    """Start the process group (NCCL on GPUs, gloo on CPU) from launcher env or MPI, and pick this rank's device."""
    import deepspeed

    if under_mpi() and "RANK" not in os.environ:
        # DeepSpeed's MPI discovery overwrites MASTER_ADDR (rank 0's first `hostname -I` address) and MASTER_PORT
        # (its `distributed_port` argument): run it here so that values the user exported win, e.g. loopback in
        # tests or the right interface on a multi-homed node.
        from deepspeed.comm.comm import mpi_discovery

        port = int(os.environ.setdefault("MASTER_PORT", "29500"))
        address = os.environ.get("MASTER_ADDR")
        mpi_discovery(distributed_port=port, verbose=False)
        if address:
            os.environ["MASTER_ADDR"] = address
    deepspeed.init_distributed(auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    _unlink_cpu_allreduce_buffer(rank, world)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return RankInfo(rank, world, local_rank, device)


SHM_DIR = Path("/dev/shm")


def cpu_allreduce_buffer_path(rank: int) -> Path:
    """The POSIX shared-memory file DeepSpeed's CPU accelerator creates per rank when all ranks share a node."""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}"


def _unlink_cpu_allreduce_buffer(rank: int, world_size: int) -> None:
    """Drop the name of this rank's CPU all-reduce buffer once every rank has mapped every buffer.

    DeepSpeed never unlinks it: each CPU run on one node left 64 MiB per rank in /dev/shm (RAM) until reboot, which
    fills a container's small /dev/shm after a few runs. The mappings stay valid after the unlink, and the kernel
    frees the memory when the last rank exits, also after a crash.
    """
    # DeepSpeed's own condition for making the buffers (LOCAL_SIZE, set by its launcher, equals the world size). It
    # is the same on every rank, so either all ranks enter the barrier or none does.
    if int(os.environ.get("LOCAL_SIZE", "0") or 0) != world_size:
        return
    dist.barrier()  # every rank has finished opening its peers' buffers inside init_distributed
    try:
        cpu_allreduce_buffer_path(rank).unlink()
    except FileNotFoundError:  # a GPU accelerator (NCCL) made no buffer
        pass


def shutdown() -> None:
    """Leave the process group cleanly (avoids aborts at interpreter exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank."""
    dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """One object from every rank, in rank order."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (returns a new tensor)."""
    result = value.detach().clone()
    dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result / dist.get_world_size()


def _find_auto(node: Any, path: str = "") -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{path}.{key}" if path else key)
            if found:
                return found
    elif node == "auto":
        return path
    return None


def load_ds_config(name_or_path: str) -> dict[str, Any]:
    """A DeepSpeed JSON config by ds_configs/ name (zero1, zero2, zero3, zero2_offload, zero3_offload) or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        names = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
        raise CogvxError(f"deepspeed.config {name_or_path!r}: no such file (named configs: {', '.join(names)})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CogvxError(f"deepspeed.config {path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def resolve_ds_config(
    base: dict[str, Any],
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    max_grad_norm: float,
    lr: float,
    betas: list[float],
    eps: float,
    weight_decay: float,
    bf16: bool,
    on_gpu: bool,
) -> dict[str, Any]:
    """Fill the run's values into a DeepSpeed config so that every value is concrete (no "auto")."""
    config = copy.deepcopy(base)
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = grad_accum_steps
    config.pop("train_batch_size", None)  # DeepSpeed derives it from the two above and the world size
    config["gradient_clipping"] = max_grad_norm
    config["bf16"] = {"enabled": bf16}
    config.pop("fp16", None)
    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    params.update({"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay})
    offloaded = "offload_optimizer" in config.get("zero_optimization", {})
    if not on_gpu and not offloaded:
        params["torch_adam"] = True  # FusedAdam needs CUDA; torch's AdamW needs no JIT build on CPU
    auto = _find_auto(config)
    if auto:
        raise CogvxError(f"DeepSpeed config value {auto} is \"auto\"; cogvx fills these from the run config")
    return config


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def build_engine(
    model: torch.nn.Module,
    ds_config: dict[str, Any],
    lr_lambda: Callable[[int], float],
) -> Any:
    """Wrap `model` in a DeepSpeed engine whose optimizer sees only trainable (LoRA) parameters."""
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]

    def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_config, lr_scheduler=make_scheduler
    )
    return engine


def save_checkpoint(engine: Any, folder: Path, client_state: dict[str, Any]) -> None:
    """Collective: write LoRA weights, optimizer and scheduler state (no frozen weights) into `folder`."""
    engine.save_checkpoint(
        str(folder.parent), tag=folder.name, client_state=client_state, exclude_frozen_parameters=True
    )


def load_checkpoint(engine: Any, folder: Path) -> dict[str, Any]:
    """Collective: restore what `save_checkpoint` wrote; returns its client state."""
    load_path, client_state = engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_module_strict=False, load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise RankError(f"cannot load checkpoint {folder}")
    return client_state or {}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: the CUDA allocator's peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024



def gather_master_weights(engine: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """Collective: whole fp32 master copies of the named parameters (ZeRO partitions gathered)."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters())
    return {name: safe_get_full_fp32_param(params[name]).detach().to("cpu", torch.float32).clone() for name in names}


def restore_master_weights(engine: Any, weights: dict[str, torch.Tensor], optimizer_steps: int) -> None:
    """Collective: load whole fp32 weights into an engine with any number of ranks and move the LR schedule to
    `optimizer_steps`. Adam's moments start again from zero (DeepSpeed's partitioned optimizer state is bound to
    the world size it was saved with)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    params = dict(engine.module.named_parameters())
    selected = [params[n] for n in weights]
    # Both the compute copies (used by forward) and the fp32 masters (updated by the optimizer) get the value.
    with deepspeed.zero.GatheredParameters(selected, modifier_rank=0, enabled=engine.zero_optimization_stage() == 3):
        with torch.no_grad():
            for name, value in weights.items():
                params[name].data.copy_(value.to(params[name].device, params[name].dtype))
    for name, value in weights.items():
        safe_set_full_fp32_param(params[name], value.to(engine.device))
    engine.lr_scheduler.last_epoch = optimizer_steps - 1
    engine.lr_scheduler.step()
