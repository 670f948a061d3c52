"""The one module that talks to DeepSpeed: the process group, collectives, and `Engine`, a small interface shaped
for this project (forward, backward, step, learning rate, grad norm, checkpoints, whole adapter weights).

No other module imports deepspeed (a test enforces it).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from cogvx_dist.core.devices import rank_device, visible_gpus
from cogvx_dist.core.errors import RankError
from cogvx_dist.core.launch_env import RankInfo, under_mpi
from cogvx_dist.train.ds_config import optimizer_type

SHM_DIR = Path("/dev/shm")
ADAM_STATES = ("exp_avg", "exp_avg_sq")
EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"


def extensions_dir(prefix: str = sys.prefix) -> Path:
    """Where DeepSpeed's JIT-built ops go for the Python environment at `prefix`: one folder per environment, so two
    installs on one machine stop rebuilding each other's ops (torch's default is one folder for all)."""
    digest = hashlib.sha256(str(Path(prefix).resolve()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "torch_extensions" / f"cogvx-{digest}"


def use_environment_extensions_dir() -> None:
    """Point torch's extension builds at this environment's folder unless the user chose one, built by this
    environment's ninja (`use_environment_ninja`)."""
    os.environ.setdefault(EXTENSIONS_ENV, str(extensions_dir()))
    use_environment_ninja()


def use_environment_ninja(prefix: str = sys.prefix) -> None:
    """Put this environment's bin folder first on PATH when it holds ninja (pip's `ninja` package installs it there).

    torch runs the first `ninja` on PATH. A venv's commands called without activating it (`.venv/bin/cogvx`, as
    scripts and schedulers do) find the system's ninja instead, and two ninja versions rewrite each other's build
    log in their own format: every switch rebuilt DeepSpeed's ops from scratch. Activation puts the same folder
    first, so an activated shell is unchanged."""
    folder = Path(prefix) / "bin"
    if not (folder / "ninja").is_file():
        return
    entries = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry]
    if entries and Path(entries[0]) == folder:
        return
    os.environ["PATH"] = os.pathsep.join([str(folder), *(entry for entry in entries if Path(entry) != folder)])


def import_deepspeed() -> ModuleType:
    """`import deepspeed` without the mlflow import that comes with it. DeepSpeed's autotuner (which cogvx never
    runs) imports mlflow at import time whenever it is installed, as it is with the `trackers` extra: 1.2 s of CPU
    and some 100 modules (fastapi, opentelemetry, the Databricks SDK) in every rank, for nothing. A run that logs to
    MLflow imports it afterwards as usual."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hidden = "mlflow" not in sys.modules
    if hidden:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError meanwhile
    try:
        import deepspeed
    finally:
        if hidden and sys.modules.get("mlflow", False) is None:
            del sys.modules["mlflow"]
    return deepspeed


def build_ops() -> list[str]:
    """Build now, into this environment's folder, the JIT ops DeepSpeed would otherwise compile on first use: CPU Adam
    (optimizer offload) and, on the CPU accelerator, the shared-memory all-reduce of single-node runs. What
    `DS_BUILD_CPU_ADAM=1 pip install deepspeed` does at install time; already-built ops load from the cache.
    Returns the names of the ops now ready."""
    use_environment_extensions_dir()
    import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    built = []
    for name in ("CPUAdamBuilder", "ShareMemCommBuilder"):
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)
            built.append(builder.NAME)
    return built


def init_distributed(timeout_s: float = 1800.0) -> RankInfo:
    """Start the process group (NCCL on GPUs, gloo on CPU) from the launcher's environment or MPI, with a
    `timeout_s` bound on its collectives; on a GPU, make this rank's device (local rank modulo the visible GPUs)
    the current one."""
    from datetime import timedelta

    use_environment_extensions_dir()
    deepspeed = import_deepspeed()

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
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(local_rank, visible_gpus())
    if device != "cpu":  # before the process group: NCCL binds its communicator to the current device
        torch.cuda.set_device(device)
    deepspeed.init_distributed(auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    _bound_deepspeed_world_group(timedelta(seconds=timeout_s))
    _unlink_cpu_allreduce_buffer(rank, world)
    return RankInfo(rank, world, local_rank, source="process group")


def _bound_deepspeed_world_group(timeout: Any) -> None:
    """Give DeepSpeed's data-parallel group the run's collective timeout.

    Without a model-parallel unit, ZeRO reduces gradients and gathers parameters on a clone of the world group
    that DeepSpeed makes with `new_group(ranks)`, which takes torch's default timeout (30 min on gloo, 10 on NCCL),
    not the one given to init_distributed: a stopped peer then hung ZeRO's reduce far past distributed.timeout_s
    (seen as huggingface/transformers#32036 too). Making the clone here, with the timeout, is the same group
    DeepSpeed would make; every rank runs this, as new_group requires.
    """
    from deepspeed.utils import groups

    if getattr(groups, "_WORLD_GROUP", "absent") is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())), timeout=timeout)
    else:
        from cogvx_dist.core.logs import rank_logger

        log = rank_logger("cogvx.train", dist.get_rank())
        log.warning("distributed.timeout_s bounds this project's collectives only: this DeepSpeed has no world-group "
                    "clone to give it to, so ZeRO's use torch's default timeout")


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


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (returns a new tensor)."""
    result = value.detach().clone()
    dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result


def all_gather_tensor(value: torch.Tensor) -> list[torch.Tensor]:
    """A tensor of the same shape from every rank, in rank order."""
    gathered = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, value.contiguous())
    return gathered


def partition_size(numel: int, world_size: int) -> int:
    """Elements of each rank's chunk of a parameter, the way ZeRO-3 partitions it (padded to a multiple of the world
    size, then cut into equal chunks in rank order)."""
    return -(-numel // world_size)


class SequenceGroups:
    """Sequence-parallel groups of `parts` consecutive ranks (each group trains on the same samples, every rank on
    its share of their tokens), in the form DeepSpeed takes as the `mpu` of Ulysses-style sequence parallelism.

    Given it, DeepSpeed reduces gradients over all ranks, summing within a group (each rank's gradient is the part
    from its tokens) and averaging over groups, and ZeRO partitions over all ranks. Without it, DeepSpeed would
    average over the group too (half the gradient at 2); declaring only `sequence_parallel_size` in its config made
    each rank apply its partial gradient twice. DeepSpeed recognises this kind of unit by its
    `initialize_sequence_parallel` method and then uses no model parallelism; it must not have
    `get_data_parallel_world_size`, from which DeepSpeed would take its batch arithmetic instead.
    """

    def __init__(self, parts: int, timeout_s: float) -> None:
        from datetime import timedelta

        timeout = timedelta(seconds=timeout_s)
        world, rank = dist.get_world_size(), dist.get_rank()
        self.parts = parts
        self.index = rank % parts
        """This rank's place in its group: which share of each sample's tokens it holds."""
        self.data_rank = rank // parts
        """The group's number: what the reader and the random draws use in place of the rank."""
        self.data_size = world // parts
        for start in range(0, world, parts):  # new_group is collective: every rank makes every group
            group = dist.new_group(list(range(start, start + parts)), timeout=timeout)
            if start <= rank < start + parts:
                self.group = group
        self.everyone = dist.new_group(list(range(world)), timeout=timeout)

    def initialize_sequence_parallel(self, sequence_parallel_size: int) -> None:
        """DeepSpeed's marker of a sequence-parallel unit; the groups exist from construction."""
        if sequence_parallel_size != self.parts:
            raise RankError(f"sequence-parallel groups of {self.parts} ranks exist, not {sequence_parallel_size}")

    def get_sequence_parallel_group(self) -> Any:
        return self.group

    def get_sequence_parallel_world_size(self) -> int:
        return self.parts

    def get_sequence_parallel_rank(self) -> int:
        return self.index

    def get_sequence_data_parallel_group(self) -> Any:
        return self.everyone

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.parts * self.data_size

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank()

    # DeepSpeed names its checkpoint files by this rank (mp_rank_NN_model_states.pt).
    get_model_parallel_group = get_sequence_parallel_group
    get_model_parallel_world_size = get_sequence_parallel_world_size
    get_model_parallel_rank = get_sequence_parallel_rank


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def _import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer with torch.compile made a no-op. Every engine start imports it (to ask whether
    the optimizer is Muon), and the module compiles a function as it is imported, which imports torch's inductor:
    a noticeable share of a rank's start-up, for a function that a run with another optimizer never calls."""
    if MUON_MODULE in sys.modules:
        return
    previous = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # read by torch.compile when it is called, here: at import
    try:
        importlib.import_module(MUON_MODULE)
    except ImportError:
        pass  # a DeepSpeed without Muon
    finally:
        if previous is None:
            os.environ.pop("TORCHDYNAMO_DISABLE", None)
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = previous


class Engine:
    """A model wrapped by DeepSpeed, whose optimizer (the DeepSpeed config's: AdamW by default, Adam or Muon, with
    the LR schedule `lr_lambda`) sees only the trainable (LoRA) parameters; with `sequence_groups`, DeepSpeed
    reduces gradients the sequence-parallel way (see `SequenceGroups`).

    DeepSpeed's calling rules stay in here: `backward` once per micro-batch, `step` once per optimizer step."""

    def __init__(self, model: torch.nn.Module, ds_config: dict[str, Any], lr_lambda: Callable[[int], float],
                 sequence_groups: SequenceGroups | None = None) -> None:
        use_environment_extensions_dir()
        deepspeed = import_deepspeed()

        trainable = [p for p in model.parameters() if p.requires_grad]
        if optimizer_type(ds_config) != "muon":
            _import_muon_uncompiled()

        def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

        self._engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=trainable, config=ds_config, lr_scheduler=make_scheduler,
            mpu=sequence_groups)

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped model."""
        return self._engine.module

    @functools.cached_property
    def parameters_by_name(self) -> dict[str, torch.nn.Parameter]:
        """The wrapped model's parameters by name (the same objects for the engine's life, ZeRO-3 included)."""
        return dict(self.module.named_parameters())

    @property
    def zero_stage(self) -> int:
        return int(self._engine.zero_optimization_stage())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward through DeepSpeed (ZeRO-3 gathers partitioned weights on the way)."""
        return self._engine(*args, **kwargs)

    def train(self) -> None:
        self._engine.train()

    def eval(self) -> None:
        self._engine.eval()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's loss (DeepSpeed scales them by the accumulation steps).

        DeepSpeed wants `step()` after every micro-batch, where all but the last of an optimizer step only count
        it: those calls are made here, so the caller steps once per optimizer step, after the last backward."""
        self._engine.backward(loss)
        if not self._engine.is_gradient_accumulation_boundary():
            self._engine.step()

    def step(self) -> None:
        """The optimizer step, after the last micro-batch's `backward`: clip, update, advance the LR schedule."""
        if not self._engine.is_gradient_accumulation_boundary():
            raise RankError("Engine.step() before the last micro-batch of the optimizer step")
        self._engine.step()

    def step_applied(self) -> bool:
        """False when the last optimizer step was skipped (DeepSpeed skips an update with non-finite gradients)."""
        return bool(self._engine.was_step_applied())

    def lr(self) -> float:
        """The learning rate the next update uses."""
        return float(self._engine.get_lr()[0])

    def grad_norm(self) -> float | None:
        """The global gradient norm of the last update, before clipping."""
        norm = self._engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def save(self, folder: Path, client_state: dict[str, Any]) -> None:
        """Collective: write DeepSpeed's own checkpoint (LoRA weights, optimizer and scheduler state, no frozen
        weights) into `folder`. Nothing of this project reads it back: its files are pickles (see
        train/checkpointer.py), kept for DeepSpeed's own tools (zero_to_fp32) and for inspection."""
        self._engine.save_checkpoint(str(folder.parent), tag=folder.name, client_state=client_state,
                                     exclude_frozen_parameters=True)

    def gather_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Collective: whole fp32 master copies of the named parameters (ZeRO partitions gathered), on the CPU."""
        from deepspeed.utils import safe_get_full_fp32_param

        params = self.parameters_by_name
        return {name: safe_get_full_fp32_param(params[name]).detach().to("cpu", torch.float32).clone()
                for name in names}

    def local_chunks(self, names: list[str]) -> list[torch.Tensor]:
        """This rank's chunk of each named parameter's compute copy (flattened views; see `partition_size`): the
        ZeRO-3 partition it holds, or under ZeRO-1/2, where every rank holds whole parameters, the same slice of them
        (shorter at the end of a parameter, which ZeRO-3 pads instead)."""
        params = self.parameters_by_name
        rank, world = dist.get_rank(), dist.get_world_size()
        chunks = []
        for name in names:
            param = params[name]
            if hasattr(param, "ds_tensor"):
                if param.ds_tensor.numel() != partition_size(param.ds_numel, world):
                    raise RankError(f"{name}: ZeRO-3 holds a partition of {param.ds_tensor.numel()} elements on rank "
                                    f"{rank}, not the {partition_size(param.ds_numel, world)} expected")
                chunks.append(param.ds_tensor.detach().view(-1))
                continue
            size = partition_size(param.numel(), world)
            chunks.append(param.detach().view(-1)[rank * size:(rank + 1) * size])
        return chunks

    def gather_moments(self, names: list[str]) -> tuple[dict[str, torch.Tensor], int]:
        """Collective: whole fp32 Adam moments of the named parameters (`exp_avg/NAME`, `exp_avg_sq/NAME`) and the
        optimizer's step count; empty before the first update."""
        from deepspeed.utils import safe_get_full_optimizer_state

        params = self.parameters_by_name
        if self._optimizer_step() == 0:
            return {}, 0
        moments = {f"{key}/{name}": safe_get_full_optimizer_state(params[name], key).detach().to("cpu").clone()
                   for name in names for key in ADAM_STATES}
        return moments, self._optimizer_step()

    def restore_moments(self, moments: dict[str, torch.Tensor], optimizer_step: int) -> None:
        """Collective: load whole Adam moments into an engine with any number of ranks. The optimizer's state exists
        only after an update, so an update with zero gradients at zero learning rate creates it first."""
        from deepspeed.utils import safe_set_full_optimizer_state

        self._create_optimizer_state()
        params = self.parameters_by_name
        for key_name, value in moments.items():
            key, name = key_name.split("/", 1)
            if self.zero_stage == 3:
                _set_zero3_partition(params[name], value.to(self._engine.device), key)
            else:
                safe_set_full_optimizer_state(params[name], value.to(self._engine.device), key)
        self._set_optimizer_step(optimizer_step)

    def _create_optimizer_state(self) -> None:
        import deepspeed

        groups = self._base_optimizer().param_groups
        rates = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = 0.0
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        # ZeRO-3 reduces whole-parameter gradients: the zero loss is taken over gathered parameters.
        gathered = deepspeed.zero.GatheredParameters(trainable, enabled=self.zero_stage == 3)
        for _ in range(self._engine.gradient_accumulation_steps()):  # updates come at the end of a window
            with gathered:
                self._engine.backward(sum(p.sum() * 0.0 for p in trainable))
            self._engine.step()
        for group, rate in zip(groups, rates):
            group["lr"] = rate

    def _base_optimizer(self) -> Any:
        optimizer = self._engine.optimizer
        return getattr(optimizer, "optimizer", optimizer)

    def _optimizer_step(self) -> int:
        """The update count Adam's bias correction uses (per-parameter state or per group, by implementation)."""
        base = self._base_optimizer()
        for state in base.state.values():
            if "step" in state:
                return int(state["step"])
        return int(base.param_groups[0].get("step", 0) or 0)

    def _set_optimizer_step(self, step: int) -> None:
        base = self._base_optimizer()
        for state in base.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(step)) if torch.is_tensor(state["step"]) else step
        for group in base.param_groups:
            if "step" in group:
                group["step"] = step

    def restore_weights(self, weights: dict[str, torch.Tensor], optimizer_steps: int) -> None:
        """Collective: load whole fp32 weights into an engine with any number of ranks and move the LR schedule to
        `optimizer_steps` (DeepSpeed's own partitioned checkpoint is bound to the world size it was saved with)."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        params = self.parameters_by_name
        selected = [params[n] for n in weights]
        # Both the compute copies (used by forward) and the fp32 masters (updated by the optimizer) get the value.
        with deepspeed.zero.GatheredParameters(selected, modifier_rank=0, enabled=self.zero_stage == 3):
            with torch.no_grad():
                for name, value in weights.items():
                    params[name].data.copy_(value.to(params[name].device, params[name].dtype))
        for name, value in weights.items():
            if self.zero_stage == 3:
                _set_zero3_partition(params[name], value.to(self._engine.device))
            else:
                safe_set_full_fp32_param(params[name], value.to(self._engine.device))
        scheduler = self._engine.lr_scheduler
        scheduler.last_epoch = optimizer_steps - 1
        scheduler.step()


def _set_zero3_partition(param: torch.nn.Parameter, value: torch.Tensor, state_key: str | None = None) -> None:
    """This rank's piece of a whole fp32 value (the master weight, or an Adam moment with `state_key`) into a ZeRO-3
    parameter's partition. DeepSpeed's set_full_hp_param cuts the piece at partition size x rank, which runs past
    the end of the value on the last rank when the size is not a multiple of the world size (256 elements on 3 ranks:
    "start (172) + length (86) exceeds dimension size (256)"), so a run could not grow to such a world size."""
    optimizer = param._z3_optimizer
    partition, group = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                               optim_state_key=state_key)
    start = partition.numel() * optimizer._get_param_partition_rank(param)
    piece = value.flatten()[start:start + partition.numel()]
    partition.data.zero_()  # the padding past the parameter's end stays zero, as DeepSpeed keeps it
    partition.data[:piece.numel()].copy_(piece)
    if optimizer._swappable_optimizer_subgroup(group):
        optimizer._optimizer_states_and_gradient_swap_out(group)
