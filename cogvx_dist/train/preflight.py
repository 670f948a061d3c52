"""Pre-flight: everything checked before any process group exists or any weight loads, so that a bad run fails on
one node with one line (`cogvx train` and `cogvx launch check` run it before starting ranks, and each rank again)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogvx_dist.core import run_folder
from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.families import SIZE_MULTIPLE
from cogvx_dist.core.loading import CheckpointInfo, describe_checkpoint
from cogvx_dist.core.lora import ExportedLora, recorded_settings
from cogvx_dist.core.shard_format import Manifest
from cogvx_dist.core.storage import Store
from cogvx_dist.train import ds_config
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.data.mixture import MixedIndex, combined_manifest
from cogvx_dist.train.data.reader import ShardIndex, bucket_tokens, budget_unit_sizes, listed_buckets
from cogvx_dist.train.data.streaming import is_remote, read_remote_manifest
from cogvx_dist.train.trackers import check_trackers


@dataclass
class Preflight:
    """What the checks found, for the ranks to use."""

    checkpoint: CheckpointInfo
    manifest: Manifest
    index: ShardIndex | MixedIndex | None
    """Random access to the dataset (or the mixture); None in streaming mode."""
    ds_config: dict[str, Any]
    """The DeepSpeed config with the run's values filled in."""
    warnings: list[str] = field(default_factory=list)
    """What the run goes on despite (damaged shards with data.on_bad_sample: skip), for the ranks to log."""
    empty_prompt: Any = None
    """The dataset's empty-prompt embedding, with train.caption_dropout (else None)."""
    initial_adapter: ExportedLora | None = None
    """The adapter lora.init_from names, read and checked against the model's family (else None)."""
    eval_index: ShardIndex | None = None
    """The held-out dataset of data.eval_shards (else None)."""


def preflight(config: RunConfig) -> Preflight:
    """Check model, shards and their match, and resolve the DeepSpeed config; no deepspeed, no weights loaded."""
    import torch

    check_output_dir(config.output_dir)
    check_trackers(config.log)
    checkpoint = describe_checkpoint(config.model.path)
    if config.data.streaming and not is_remote(config.data.shards):
        raise CogvxError(f"data.streaming is on but data.shards {config.data.shards!r} is a local folder: streaming "
                         "reads http(s):// or pipe: locations; a folder is read in exact order")
    if not config.data.streaming and config.data.shards.startswith("pipe:"):
        raise CogvxError(f"data.shards {config.data.shards!r}: a pipe: location can only be streamed "
                         "(data.streaming: true); exact order reads folders and s3://, gs://, http(s):// URLs")
    if config.data.sources:
        manifest, index = _open_mixture(config, checkpoint)
    elif config.data.streaming:
        manifest, index = read_remote_manifest(config.data.shards), None
        check_manifest(manifest, checkpoint, where=f"data.shards {config.data.shards}")
    else:
        manifest, index = _open_dataset(config, checkpoint, config.data.shards, "data.shards")
    warnings = _damaged_shards(config, index)
    _check_resume_fits(config, checkpoint)
    warnings += _bucketed_batches(config, manifest, index)
    if config.train.micro_batch_size > manifest.num_samples:
        raise CogvxError(f"train.micro_batch_size {config.train.micro_batch_size} exceeds the "
                         f"{manifest.num_samples} samples")
    values = ds_config.run_values(
        micro_batch_size=config.train.micro_batch_size, grad_accum_steps=config.train.grad_accum_steps,
        max_grad_norm=config.optim.max_grad_norm, lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps,
        weight_decay=config.optim.weight_decay, bf16=config.model.dtype == "bfloat16")
    resolved = ds_config.resolve_ds_config(ds_config.load_ds_config(config.deepspeed.config), values,
                                           on_gpu=torch.cuda.is_available())
    if config.model.compile == "blocks" and ds_config.zero_stage(resolved) == 3:
        raise CogvxError("model.compile: blocks does not go with ZeRO-3: its parameter-gathering hooks run inside "
                         "every block, so torch.compile traces them and recompiles past its limit; use zero2 (ZeRO-3 "
                         "saves only frozen-weight memory here, the adapter is small) or model.compile: off")
    warnings += _sequence_parallel(config, checkpoint, resolved)
    empty_prompt = None
    if config.train.caption_dropout and index is not None:
        try:
            empty_prompt = index.empty_prompt()
        except CogvxError as err:
            raise CogvxError(f"train.caption_dropout: {err}") from err
    return Preflight(checkpoint, manifest, index, resolved, warnings, empty_prompt,
                     _initial_adapter(config, checkpoint), _held_out(config, checkpoint))


def check_output_dir(output_dir: str) -> None:
    """output_dir must be a folder this process can create and write; else the ranks start and die at their first
    write with a traceback. Asking os.access is not enough: root is told yes for any mode, and for folders made
    immutable, so a temporary folder is made (and removed at once) where the run will write."""
    output = Path(output_dir)
    existing = next((p for p in (output, *output.parents) if p.exists()), Path.cwd())
    if not existing.is_dir():
        what = "is a file" if existing == output else f"cannot be created: {existing} is a file"
        raise CogvxError(f"output_dir {output} {what}, not a folder; pick another output_dir")
    foreign = run_folder.foreign_outputs(output)
    if foreign:
        raise CogvxError(f"output_dir {output} is not a cogvx run folder (no {run_folder.RUN_CONFIG}) but holds "
                         f"{', '.join(foreign)}, which a run would overwrite or prune; pick a new or empty folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cogvx-write-check-", dir=existing))
    except OSError as err:
        what = "cannot be written" if existing == output else f"cannot be created in {existing}"
        raise CogvxError(f"output_dir {output} {what} ({err.strerror or err}); pick another output_dir or fix "
                         "its permissions") from err


def _sequence_parallel(config: RunConfig, checkpoint: CheckpointInfo, resolved: dict[str, Any]) -> list[str]:
    """What parallel.sequence_parallel needs of the rest of the run (it may change `resolved`); its warnings."""
    parts = config.parallel.sequence_parallel
    if parts == 1:
        return []
    if config.model.compile == "blocks":
        raise CogvxError("model.compile: blocks does not go with parallel.sequence_parallel > 1 yet: the all-to-all "
                         "inside each block's attention is not traced; use model.compile: off")
    if ds_config.zero_stage(resolved) == 3:
        # ZeRO-3's reduce-scatter averages over every rank, sequence-parallel ones included: half the gradient at 2.
        resolved.setdefault("zero_optimization", {})["reduce_scatter"] = False
    from cogvx_dist.train.step.sequence_parallel import head_imbalance

    imbalance = head_imbalance(checkpoint.transformer_config["num_attention_heads"], parts)
    return [imbalance] if imbalance else []


def _held_out(config: RunConfig, checkpoint: CheckpointInfo) -> ShardIndex | None:
    """data.eval_shards opened and checked against the model; it must be whole, and the timesteps in range."""
    if not config.data.eval_shards:
        return None
    from cogvx_dist.core.loading import read_component_config

    _, index = _open_dataset(config, checkpoint, config.data.eval_shards, "data.eval_shards")
    if index.damaged:
        location, why = sorted(index.damaged.items())[0]
        raise CogvxError(f"data.eval_shards: shard {location}: {why}; a held-out set must be whole")
    # The config, not the scheduler: loading it imports diffusers, which `cogvx train` would pay before any rank.
    steps = read_component_config(config.model.path, "scheduler").get("num_train_timesteps", 1000)
    beyond = [t for t in config.log.eval_timesteps if t >= steps]
    if beyond:
        raise CogvxError(f"log.eval_timesteps {beyond} beyond the scheduler's {steps} training timesteps "
                         f"(0..{steps - 1})")
    return index


def _check_resume_fits(config: RunConfig, checkpoint: CheckpointInfo) -> None:
    """The checkpoint a run resumes from (a named one must be whole) must hold the adapter the config trains: another
    rank or target set fails deep in DeepSpeed's load with a tensor-size error, another alpha or family would
    silently train another model."""
    from cogvx_dist.train.checkpoints import find_resume_point

    resume_from, _ = find_resume_point(config.output_dir, config.checkpoint.resume)
    adapter = resume_from / run_folder.LORA if resume_from is not None else None
    if adapter is None or not adapter.is_dir():
        return
    recorded, family = recorded_settings(adapter)
    differences = [f"{key} {saved} (this config: {now})" for key, saved, now in (
        ("lora.rank", recorded.get("r"), config.lora.rank),
        ("lora.alpha", recorded.get("lora_alpha"), config.lora.alpha),
        ("lora.target_modules", sorted(recorded.get("target_modules") or []) or None,
         sorted(config.lora.target_modules)),
        ("family", family, checkpoint.family.name),
    ) if saved is not None and saved != now]
    if differences:
        raise CogvxError(f"checkpoint.resume: {resume_from} was trained with {', '.join(differences)}; resume with "
                         "its settings, or train the new ones in another output_dir")


def _initial_adapter(config: RunConfig, checkpoint: CheckpointInfo) -> ExportedLora | None:
    """lora.init_from read, and refused when it records another family (5b, 5b-I2V and 1.5-5b adapters have the
    same shapes, so the shapes checked when the model is built cannot tell them apart)."""
    adapter = config.lora.initial_adapter()
    if adapter is not None and adapter.family and adapter.family != checkpoint.family.name:
        raise CogvxError(f"lora.init_from {adapter.file} was trained on {adapter.family}, but model.path is "
                         f"{checkpoint.family.name}")
    return adapter


def _open_dataset(config: RunConfig, checkpoint: CheckpointInfo, location: str,
                  key: str) -> tuple[Manifest, ShardIndex]:
    """One dataset's manifest, checked against the model, and its index; errors name the config key."""
    store = Store(location, config.data.storage_options)
    try:
        manifest = Manifest.read(location, store)
    except CogvxError as err:
        raise CogvxError(f"{key}: {err}") from err
    check_manifest(manifest, checkpoint, where=f"{key} {location}")
    return manifest, ShardIndex(location, manifest, config.data.verify, config.data.storage_options)


def _open_mixture(config: RunConfig, checkpoint: CheckpointInfo) -> tuple[Manifest, MixedIndex]:
    """Every source of a mixture, each checked against the model, and the manifest standing for them all."""
    opened = [_open_dataset(config, checkpoint, source.shards, f"data.sources[{number}].shards")
              for number, source in enumerate(config.data.sources)]
    combined = combined_manifest([manifest for manifest, _ in opened])
    index = MixedIndex([index for _, index in opened], config.source_names(),
                       [source.weight for source in config.data.sources])
    return combined, index


def _damaged_shards(config: RunConfig, index: ShardIndex | MixedIndex | None) -> list[str]:
    """Shards whose size differs from the manifest: an error, or with on_bad_sample skip a warning each."""
    if index is None or not index.damaged:
        return []
    problems = [f"shard {location}: {why}" for location, why in sorted(index.damaged.items())]
    if config.data.on_bad_sample == "fail":
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CogvxError(f"data.shards: {problems[0]}{more}; run `cogvx shards verify`, or train on without its "
                         "unreadable samples with data.on_bad_sample: skip")
    return [f"{problem}; its unreadable samples will be skipped" for problem in problems]


def _bucketed_batches(config: RunConfig, manifest: Manifest, index: ShardIndex | MixedIndex | None) -> list[str]:
    """micro_batch_size > 1 over samples of several shapes, or a token budget: every micro-batch is one bucket's
    (reader.BucketedStream). Refuses what cannot be batched so, in one line; returns what the run goes on despite."""
    micro, budget = config.train.micro_batch_size, config.train.micro_batch_tokens
    listed = listed_buckets(manifest)
    if (micro == 1 or listed == 1) and not budget:
        return []
    advice = "use micro_batch_size 1 with grad_accum_steps for a larger batch"
    if not isinstance(index, ShardIndex):  # a budget never gets here: the config refuses it with these
        where = "data.sources (a mixture)" if config.data.sources else "data.streaming"
        raise CogvxError(f"train.micro_batch_size {micro} with {where} over {listed} buckets (resolutions x frame "
                         f"counts): micro-batches of one bucket each are made for one dataset read in exact order, not "
                         f"yet for {'mixtures' if config.data.sources else 'streaming'}; {advice}")
    buckets = index.buckets()  # reads every sample's tensors header (its shape), once
    if len(buckets) < 2 and not budget:
        return []  # the samples fill one bucket: the plain order, which reads (or skips) bad samples as it always did
    key = f"train.micro_batch_tokens {budget}" if budget else f"train.micro_batch_size {micro}"
    sizes = budget_unit_sizes(buckets, manifest.family, budget) if budget else [micro] * len(buckets)
    warnings = []
    if index.unshaped:
        first, why = min(index.unshaped.items())
        more = f" (and {len(index.unshaped) - 1} more)" if len(index.unshaped) > 1 else ""
        sample = f"shard {index.store.url(index.shard_of(first))}, sample {index.key(first)}: {why}{more}"
        if config.data.on_bad_sample == "fail":
            raise CogvxError(f"data.shards: {sample}, so its bucket is unknown; run `cogvx shards verify`, or train on "
                             "without it with data.on_bad_sample: skip")
        warnings.append(f"{sample}; with {key} such samples are in no bucket and never read")
    small = [(bucket, size) for bucket, size in zip(buckets, sizes) if len(bucket.samples) < size]
    if small:
        (bucket, size), largest = small[0], min(len(b.samples) for b in buckets)
        if budget:  # the largest budget whose micro-batches every small bucket fills: (samples + 1) x tokens - 1
            fits = min((len(b.samples) + 1) * bucket_tokens(b, manifest.family) for b, _ in small) - 1
            change = f"micro_batch_tokens {fits} or less"
        else:
            change = f"micro_batch_size {largest} or less"
        batch = f"one micro-batch ({size})" if budget else "one micro-batch"
        raise CogvxError(f"{key}: the {bucket.name} bucket holds {len(bucket.samples)} sample(s), fewer than {batch}, "
                         f"so they could never be trained on; use {change}, or prep more samples of that shape, or "
                         "leave them out")
    left = [(bucket, len(bucket.samples) % size) for bucket, size in zip(buckets, sizes) if len(bucket.samples) % size]
    if left:
        total, samples = sum(n for _, n in left), sum(len(bucket.samples) for bucket in buckets)
        warnings.append(f"{key}: {total} of the {samples} samples are left out of each epoch, "
                        "a different draw each epoch (a bucket's samples short of a whole micro-batch: "
                        + ", ".join(f"{n} of {len(bucket.samples)} in {bucket.name}" for bucket, n in left) + ")")
    return warnings


def check_batch_fits(config: RunConfig, manifest: Manifest, world_size: int) -> int:
    """The global batch of `world_size` ranks (their data-parallel groups, with sequence parallelism), checked
    against the batch arithmetic and the dataset's size."""
    data_ranks = config.data_parallel_size(world_size)
    global_batch = config.check_world(data_ranks)
    if manifest.num_samples < global_batch:
        raise CogvxError(
            f"data.shards has {manifest.num_samples} samples, fewer than one global batch of {global_batch} "
            f"(micro_batch_size {config.train.micro_batch_size} x grad_accum_steps {config.train.grad_accum_steps} "
            f"x {data_ranks} data-parallel ranks): every step would repeat samples; use fewer ranks or smaller "
            "batches, or prep more data")
    return global_batch


def check_elastic_range(config: RunConfig, min_nodes: int, max_nodes: int, ranks_per_node: int) -> None:
    """An elastic job (torchrun --nnodes MIN:MAX) must train the same global batch at every node count it may run
    at: refuse, in one line naming the ranges that work, a range where no whole grad_accum_steps keeps it.
    (DeepSpeed's own elasticity rules were removed from DeepSpeed; this is the same divisibility test.)"""
    if not 1 <= min_nodes <= max_nodes:
        raise CogvxError(f"elastic node range {min_nodes}:{max_nodes}: expected MIN:MAX with 1 <= MIN <= MAX")
    if min_nodes == max_nodes:
        return
    if not config.train.global_batch_size:
        raise CogvxError(f"elastic node range {min_nodes}:{max_nodes} needs train.global_batch_size: without it the "
                         "global batch is micro_batch_size x grad_accum_steps x ranks and changes with the node count")

    def keeps(nodes: int) -> bool:
        try:
            config.check_world(config.data_parallel_size(nodes * ranks_per_node))
        except CogvxError:
            return False
        return True

    bad = [nodes for nodes in range(min_nodes, max_nodes + 1) if not keeps(nodes)]
    if not bad:
        return
    runs: list[list[int]] = []
    for nodes in range(1, max(max_nodes, config.train.global_batch_size) + 1):
        if keeps(nodes):
            if runs and runs[-1][1] == nodes - 1:
                runs[-1][1] = nodes
            else:
                runs.append([nodes, nodes])
    working = ", ".join(f"{lo}:{hi}" for lo, hi in runs) or "none"
    raise CogvxError(f"elastic node range {min_nodes}:{max_nodes}: train.global_batch_size "
                     f"{config.train.global_batch_size} cannot be kept at {bad[0]} node(s) x {ranks_per_node} ranks "
                     f"(micro_batch_size {config.train.micro_batch_size}); node ranges that keep it: {working}")


def check_manifest(manifest: Manifest, checkpoint: CheckpointInfo, where: str) -> None:
    """Refuse shards made for another family, VAE, text encoder or resolution, saying what differs."""
    family = checkpoint.family
    config = checkpoint.transformer_config
    problems = []
    if manifest.family != family.name:
        problems.append(f"family {manifest.family} (model is {family.name})")
    if abs(manifest.vae_scaling_factor - family.vae_scaling_factor) > 1e-6:
        problems.append(f"VAE scaling factor {manifest.vae_scaling_factor} (model family uses "
                        f"{family.vae_scaling_factor})")
    if manifest.invert_scale_latents != family.invert_scale_latents:
        problems.append(f"invert_scale_latents {manifest.invert_scale_latents} (family: {family.invert_scale_latents})")
    if manifest.latent_channels != config.get("out_channels", 16):
        problems.append(f"{manifest.latent_channels} latent channels (transformer: {config.get('out_channels')})")
    if manifest.text_embed_dim != config.get("text_embed_dim"):
        problems.append(f"text embedding width {manifest.text_embed_dim} (transformer: {config.get('text_embed_dim')})")
    if manifest.text_max_length != config.get("max_text_seq_length", family.text_max_length):
        problems.append(f"text length {manifest.text_max_length} (transformer: {config.get('max_text_seq_length')})")
    for height, width in manifest.sizes():
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            problems.append(f"resolution {height}x{width} (must be a multiple of {SIZE_MULTIPLE})")
        if family.use_learned_positional_embeddings:
            expected = family.native_pixel_size(config)
            if (height, width) != expected:
                problems.append(f"resolution {height}x{width} (learned positions fix {expected[0]}x{expected[1]})")
        beyond = family.position_grid_problem(height, width, config)
        if beyond:
            problems.append(beyond)
    if family.use_learned_positional_embeddings and manifest.frames != config.get("sample_frames", manifest.frames):
        problems.append(f"{manifest.frames} frames (learned positions fix {config['sample_frames']})")
    if 1 in manifest.all_frame_counts() and family.single_image_problem():
        problems.append(f"single images among the clips ({family.single_image_problem()})")
    if manifest.image_to_video != family.image_to_video:
        problems.append("image conditioning " + ("present" if manifest.image_to_video else "absent")
                        + f" (family {family.name} " + ("needs it)" if family.image_to_video else "has none)"))
    if problems:
        raise CogvxError(f"{where}: shards do not match the model: " + "; ".join(problems))
