"""Measuring a training step's activation memory and FLOPs without running it: one forward and backward of the real
diffusers transformer, with the injected LoRA, the project's gradient checkpointing and its own loss, traced under
fake tensors (shapes and dtypes, no data) on the CPU.

Every storage an operation creates is recorded with its size (rounded to the CUDA caching allocator's 512 bytes)
when it appears and again when it is freed, so the peak of the live bytes over the step is what the GPU allocator
would hold for activations, recomputed activations and temporaries. Parameters, inputs and the LoRA gradients are
left out: the planner counts those per ZeRO stage. Attention runs as the fused kernel GPUs use (flash/cuDNN keep
the output and a log-sum-exp, never the N x N scores): on the CPU that is the flash kernel, selected explicitly.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from cogvx_dist.core.families import ModelFamily
from cogvx_dist.core.lora import LoraSettings, inject_lora

ALLOCATOR_GRANULE = 512
"""The CUDA caching allocator hands out blocks in multiples of 512 bytes."""


class LiveMemory(TorchDispatchMode):
    """Records every storage that operations create: +bytes when it appears, -bytes when it is freed, in order."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.events: list[tuple[int, int]] = []
        self._known: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._tokens = itertools.count()
        self._refs: dict[int, weakref.ref] = {}
        for tensor in existing:  # parameters and inputs exist before the step: not the step's memory
            self._known[tensor.untyped_storage()] = -1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._record(tensor)
        return out

    def _record(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._known:
            return  # a view of a storage already counted
        token = next(self._tokens)
        size = math.ceil(storage.nbytes() / ALLOCATOR_GRANULE) * ALLOCATOR_GRANULE
        self._known[storage] = token
        self.events.append((token, size))

        def freed(_: weakref.ref, token: int = token, size: int = size) -> None:
            self.events.append((token, -size))
            self._refs.pop(token, None)

        # Storages keep their Python object for as long as they live, so the weakref fires when the memory goes.
        self._refs[token] = weakref.ref(storage, freed)

    def token(self, tensor: torch.Tensor) -> int | None:
        return self._known.get(tensor.untyped_storage())

    def peak(self, leave_out: set[int]) -> int:
        """The most bytes alive at once, without the storages in `leave_out`."""
        live = peak = 0
        for token, size in self.events:
            if token not in leave_out:
                live += size
                peak = max(peak, live)
        return peak


@dataclass(frozen=True)
class StepShape:
    """What one traced step trains."""

    family: ModelFamily
    transformer_config: dict[str, Any]
    frames: int
    height: int
    width: int
    micro_batch_size: int
    lora: LoraSettings
    gradient_checkpointing: int
    """Recompute every k-th block (1: all, 0: none)."""
    dtype: torch.dtype = torch.bfloat16
    sequence_parallel: int = 1
    """Ranks sharing each sample's tokens: the trace is then of the first, which holds the largest share, with
    the all-to-alls replaced by tensors of the shapes they would receive."""


@dataclass(frozen=True)
class StepTrace:
    """What the trace measured."""

    activation_peak: int
    """Peak bytes of activations, recomputed activations and temporaries during the step."""
    flops: int
    """Floating-point operations of the step: forward, backward and the recomputation of checkpointed blocks."""
    model_flops: int
    """The same without recomputation (what MFU counts)."""
    frozen_parameters: int
    lora_parameters: int
    largest_block_parameters: int
    """Parameters of the largest transformer block (what ZeRO-3 gathers at a time)."""
    tokens: int
    """Transformer tokens of one sample."""
    seconds: float


def trace_step(shape: StepShape) -> StepTrace:
    """Trace one micro-batch's forward and backward under fake tensors (or real ones, for checking the method)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    started = time.perf_counter()
    model = _meta_model(shape)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        result = _run(model, shape)
    forward, total = model_flops(shape)
    blocks = len(model.transformer_blocks)
    every = shape.gradient_checkpointing
    recomputed = forward * (len(range(0, blocks, every)) / blocks if every else 0.0)
    return StepTrace(result[0], int(total + recomputed), total, *result[1:], seconds=time.perf_counter() - started)


_FLOPS: dict[str, tuple[int, int]] = {}


def model_flops(shape: StepShape) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) of one micro-batch without recomputation, counted once per shape
    in this process: they do not depend on checkpointing, so a search's three traces share one count."""
    key = repr(dataclasses.replace(shape, gradient_checkpointing=0))
    if key not in _FLOPS:
        from torch._subclasses.fake_tensor import FakeTensorMode

        # A pass of its own: the counter's hooks keep checkpointed activations alive, spoiling the memory trace.
        counted = _meta_model(shape, checkpointing=False)
        with FakeTensorMode(allow_non_fake_inputs=True):
            _FLOPS[key] = _count_flops(counted.to_empty(device="cpu"), shape)
    return _FLOPS[key]


_TRACES: dict[str, StepTrace] = {}


def cached_trace(shape: StepShape) -> StepTrace:
    """trace_step, once per shape in this process (a search plans many strategies on a few traces)."""
    key = repr(shape)
    if key not in _TRACES:
        _TRACES[key] = trace_step(shape)
    return _TRACES[key]


def trace_step_on_real_tensors(shape: StepShape) -> StepTrace:
    """The same accounting on real CPU tensors (small configs only: it computes and allocates for real)."""
    started = time.perf_counter()
    model = _meta_model(shape).to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.02)
    peak, *rest = _run(model, shape)
    return StepTrace(peak, 0, 0, *rest, seconds=time.perf_counter() - started)


def _meta_model(shape: StepShape, checkpointing: bool = True) -> torch.nn.Module:
    from diffusers import CogVideoXTransformer3DModel

    from cogvx_dist.train.step.model import enable_gradient_checkpointing

    # The adapters on meta too: PEFT builds each on the default device and draws its initial weights there before
    # moving it beside its base layer (for a 5b model at rank 128, hundreds of millions of values drawn and never used).
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**_constructor_args(shape.transformer_config))
        inject_lora(model, shape.lora, seed=0)
    # Then every weight to the run's dtype, as PEFT casts an adapter to its base layer's when it moves one (it
    # moves none that is on meta already). nn.Module.to, not ModelMixin.to: the latter warns about fp32-kept
    # modules, which CogVideoX has none of.
    torch.nn.Module.to(model, shape.dtype)
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model, shape.gradient_checkpointing)
    return model


def _constructor_args(config: dict[str, Any]) -> dict[str, Any]:
    import inspect

    from diffusers import CogVideoXTransformer3DModel

    accepted = set(inspect.signature(CogVideoXTransformer3DModel.__init__).parameters)
    return {k: v for k, v in config.items() if k in accepted}


def _run(model: torch.nn.Module, shape: StepShape) -> tuple[int, int, int, int, int]:
    """(activation peak, frozen parameters, LoRA parameters, largest block's parameters, tokens per sample)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lora = [p for p in model.parameters() if p.requires_grad]
    batch = _batch(shape)
    tracker = LiveMemory([*model.parameters(), *model.buffers(), *(t for t in batch.values() if torch.is_tensor(t))])
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), tracker:
        _loss(model, shape, batch).backward()
    gradients = {tracker.token(p.grad) for p in lora if p.grad is not None}
    blocks = [sum(p.numel() for p in block.parameters()) for block in model.transformer_blocks]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    tokens = shape.family.tokens_per_sample(shape.frames, shape.height, shape.width)
    return tracker.peak(gradients), frozen, sum(p.numel() for p in lora), max(blocks), tokens


def _count_flops(model: torch.nn.Module, shape: StepShape) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) of one micro-batch without recomputation."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # The math backend spells attention out as matrix products, which the counter sees; it has no count for the
    # CPU flash kernel, which would leave attention (most of a long clip's FLOPs) out.
    with sdpa_kernel([SDPBackend.MATH]), counter:
        loss = _loss(model, shape, _batch(shape))
        forward = counter.get_total_flops()
        loss.backward()
    return forward, counter.get_total_flops()


def _loss(model: torch.nn.Module, shape: StepShape, batch: dict[str, Any]) -> torch.Tensor:
    """The project's own training loss (train/step/loss.py) for this micro-batch (this rank's part of it with sequence
    parallelism)."""
    from cogvx_dist.train.step.loss import LossContext, diffusion_loss
    from cogvx_dist.train.step.sequence_parallel import SHAPES_ONLY, enable_sequence_parallel

    sequence = None
    if shape.sequence_parallel > 1:
        sequence = enable_sequence_parallel(model, SHAPES_ONLY, shape.sequence_parallel, 0)
    context = LossContext(shape.family, shape.transformer_config, _scheduler(shape.family), sequence)
    return diffusion_loss(model, batch, context, torch.Generator().manual_seed(0), torch.device("cpu"), shape.dtype)


def _batch(shape: StepShape) -> dict[str, Any]:
    """A micro-batch of the shard format's tensors (unscaled posterior moments, prompt embeddings)."""
    from cogvx_dist.core import shard_format

    family, config = shape.family, shape.transformer_config
    latent = family.latent_shape(config["out_channels"], shape.frames, shape.height, shape.width)
    size = shape.micro_batch_size
    batch: dict[str, Any] = {
        shard_format.LATENT_MEAN: torch.zeros(size, *latent),
        shard_format.LATENT_LOGVAR: torch.zeros(size, *latent),
        shard_format.PROMPT_EMBEDS: torch.zeros(size, config.get("max_text_seq_length", family.text_max_length),
                                                config["text_embed_dim"]),
        "keys": [f"sample{i}" for i in range(size)],
    }
    if family.image_to_video:
        image = (latent[0], 1, *latent[2:])
        batch[shard_format.IMAGE_MEAN] = torch.zeros(size, *image)
        batch[shard_format.IMAGE_LOGVAR] = torch.zeros(size, *image)
    return batch


def _scheduler(family: ModelFamily) -> Any:
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler(**family.scheduler_config())

