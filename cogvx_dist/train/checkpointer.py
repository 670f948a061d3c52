"""One rank's side of checkpoints: restore the run's state from the resume point (in the layout it was saved in, or
from the whole-tensor copies when the layout changed), save a checkpoint and commit it, export the final adapter.

The folder format, the commit marker and `resume: auto` live in train/checkpoints.py; this module moves the
engine's state in and out of those folders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cogvx_dist.core.errors import RankError
from cogvx_dist.core.faults import delay_hook
from cogvx_dist.core.files import describe_io_error, disk_is_full, write_atomic
from cogvx_dist.core.launch_env import RankInfo
from cogvx_dist.core.logs import rank_logger
from cogvx_dist.core.lora import adapter_checksum, export_lora, load_exported_lora, memory_names, state_dict_names
from cogvx_dist.core.model_card import run_card_facts, write_model_card
from cogvx_dist.core.run_folder import RunFolder
from cogvx_dist.train import checkpoints, engine, records
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.ds_config import ADAM_TYPES, offloads_optimizer, optimizer_type, zero_stage
from cogvx_dist.train.ema import AdapterEMA

LAYOUT_NAMES = {"world_size": "world size", "sequence_parallel": "sequence parallelism", "zero_stage": "ZeRO stage",
                "dtype": "model.dtype", "optimizer_offload": "optimizer offload", "optimizer": "optimizer"}
"""The keys of a checkpoint's layout (`layout`), as the resume warning names them."""


def layout(config: RunConfig, ds_config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """How the engine holds the training state: DeepSpeed's own checkpoint files fit only the layout that wrote
    them (the ZeRO stage's partitions, the bf16 optimizer's file names, CPU Adam's state, one partition per rank)."""
    return {"world_size": world_size, "sequence_parallel": config.parallel.sequence_parallel,
            "zero_stage": zero_stage(ds_config), "dtype": config.model.dtype,
            "optimizer_offload": offloads_optimizer(ds_config), "optimizer": optimizer_type(ds_config)}


@dataclass
class ResumePoint:
    """Where a run starts: the resume checkpoint's counters, or zeros."""

    step: int = 0
    """Optimizer steps done."""
    position: int = 0
    """Samples of the global stream consumed."""
    bad_samples: int = 0
    """Bad samples skipped so far."""
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss so far."""


class Checkpointer:
    """Restores and saves the state of one rank's engine, adapter average and counters in the run folder."""

    def __init__(self, config: RunConfig, ds_config: dict[str, Any], ranks: RankInfo, model: engine.Engine,
                 lora_names: list[str], ema: AdapterEMA | None, family_name: str) -> None:
        self.config = config
        self.ranks = ranks
        self.run = RunFolder(config.output_dir)
        self.log = rank_logger("cogvx.train", ranks.rank)
        self.engine = model
        self.lora_names = lora_names
        self.ema = ema
        self.family_name = family_name
        self.layout = layout(config, ds_config, ranks.world_size)
        self.saved_step = -1
        """The step of the newest checkpoint this run committed or resumed from (-1: none)."""
        self.slow_save = delay_hook("train.save_delay_ms")

    def restore(self) -> ResumePoint:
        """Collective: load the resume checkpoint into the engine and the average; the point to go on from."""
        resume_from, passed_over = checkpoints.find_resume_point(self.config.output_dir, self.config.checkpoint.resume)
        for warning in passed_over:
            self.log.warning("%s", warning)
        chosen = engine.all_gather_object(str(resume_from))
        if len(set(chosen)) != 1:
            raise RankError(f"ranks chose different checkpoints to resume from: {chosen}")
        if resume_from is None:
            records.truncate(self.run, self.ranks, 0)
            self._start_ema(None)
            return ResumePoint()
        committed = checkpoints.read_commit(resume_from)
        point = ResumePoint(int(committed["step"]), int(committed["position"]), int(committed.get("bad_samples", 0)),
                            int(committed.get("skipped_steps", 0)))
        # Checkpoints from before a layout key was recorded were saved in the layout of their time: taken as this one.
        changed = {key: (committed.get(key, now), now) for key, now in self.layout.items()
                   if committed.get(key, now) != now}
        self._restore_from_copies(resume_from, point.step, changed)
        self._start_ema(resume_from)
        records.truncate(self.run, self.ranks, point.step)
        self.saved_step = point.step
        self.log.info("resumed from %s: step %d, sample position %d (saved with %d ranks, now %d)", resume_from,
                      point.step, point.position, committed["world_size"], self.ranks.world_size)
        if point.step >= self.config.train.max_steps:
            self.log.info("nothing to do: step %d >= train.max_steps %d", point.step, self.config.train.max_steps)
        return point

    def _start_ema(self, checkpoint: Path | None) -> None:
        """The moving average from the checkpoint's lora_ema/, or from the current weights."""
        if self.ema is None:
            return
        chunks = self.engine.local_chunks(self.lora_names)
        saved = checkpoint / self.run.lora_ema.name if checkpoint is not None else None
        if saved is None or not saved.is_dir():
            if saved is not None:
                self.log.warning("%s has no adapter average: train.ema_decay starts it at the resumed weights",
                                 checkpoint)
            self.ema.start(chunks)
            return
        whole = memory_names(load_exported_lora(saved).state)
        if sorted(whole) != self.lora_names:
            raise RankError(f"{saved}: the saved average does not hold this run's adapter layers")
        self.ema.restore(whole, chunks)

    def _restore_from_copies(self, folder: Path, step: int, changed: dict[str, tuple[Any, Any]]) -> None:
        """Weights, LR schedule and Adam's moments from the checkpoint's safetensors copies, in any layout.

        DeepSpeed's own files are never read on resume: its loader unpickles them (torch.load with weights_only
        off), and a run folder is often shared, so a planted file would run code in every rank. They fit only the
        layout that wrote them anyway. Adam's moments carry over unless the optimizer changed to or from one that
        keeps none; another optimizer's state (Muon's momentum) starts fresh."""
        saved_type, new_type = changed.get("optimizer", (self.layout["optimizer"], self.layout["optimizer"]))
        keeps_moments = saved_type in ADAM_TYPES and new_type in ADAM_TYPES
        moments = checkpoints.read_adam_moments(folder) if keeps_moments else None
        if moments is not None and moments[0]:
            self.engine.restore_moments(*moments)
        weights, _ = checkpoints.read_master_weights(folder)
        self.engine.restore_weights(weights, step)
        if not changed and keeps_moments and moments:
            return
        restarted = (" (no Adam moments saved: they restart)" if keeps_moments
                     else " (the new optimizer's state starts fresh)" if "optimizer" in changed
                     else f" ({new_type}'s state starts fresh: only Adam's moments are kept)")
        what = " and ".join(f"{LAYOUT_NAMES[key]} changed ({before} -> {now})"
                            for key, (before, now) in changed.items()) or "resumed"
        self.log.warning("%s: weights, LR schedule, sample position%s restored from whole-tensor copies", what,
                         " and Adam moments" if moments else restarted)

    def save(self, step: int, position: int, bad_samples: int, skipped_steps: int) -> bool:
        """Collective: checkpoint the engine, export the adapter and whole-tensor copies, then commit and prune.
        False when the step is already saved (nothing written)."""
        if step == self.saved_step:
            return False
        folder = self.run.checkpoint(step)
        state = {"step": step, "position": position, "seed": self.config.train.seed, **self.layout,
                 "bad_samples": bad_samples,
                 "skipped_steps": skipped_steps,
                 "rng": "noise, timesteps and order derive from (seed, step, micro-step, rank); nothing to restore"}
        try:
            self._write(folder, state)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError of its zip writer
            if not isinstance(err, OSError) and not disk_is_full(folder):
                raise
            raise RankError(f"saving checkpoint step {step} failed: {describe_io_error(err, folder)}; the previous "
                            "committed checkpoint is intact") from err
        self.saved_step = step
        return True

    def _write(self, folder: Path, state: dict[str, Any]) -> None:
        self.engine.save(folder, state)
        if self.slow_save:
            self.slow_save()
        masters = self.engine.gather_weights(self.lora_names)
        moments, optimizer_step = self.engine.gather_moments(self.lora_names)
        adapter = state_dict_names(masters)
        average = state_dict_names(self.ema.gather()) if self.ema is not None else None
        if self.ranks.is_main:
            export_lora(adapter, self.config.lora, folder / self.run.lora.name, self.family_name)
            if average is not None:
                export_lora(average, self.config.lora, folder / self.run.lora_ema.name, self.family_name)
            checkpoints.write_master_weights(folder, masters, {"step": state["step"], "position": state["position"]})
            if moments:
                checkpoints.write_adam_moments(folder, moments, optimizer_step)
        engine.barrier()
        if self.ranks.is_main:
            checkpoints.commit(folder, {**state, "adapter_checksum": adapter_checksum(adapter)})
            checkpoints.prune(self.config.output_dir, self.config.checkpoint.keep_last)
        engine.barrier()

    def final_adapter(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Collective: the trained adapter in the diffusers naming and every rank's checksum of it (checked equal)."""
        final = state_dict_names(self.engine.gather_weights(self.lora_names))
        checksums = engine.all_gather_object(adapter_checksum(final))
        if len(set(checksums)) != 1:
            raise RankError(f"adapters differ across ranks after training: {checksums}")
        return final, checksums

    def export_final(self, final: dict[str, torch.Tensor], summary: dict[str, Any]) -> None:
        """Collective for the average's gather: rank 0 exports the adapter (and its average) and the run summary."""
        average = state_dict_names(self.ema.gather()) if self.ema is not None else None
        if not self.ranks.is_main:
            return
        config = self.config
        try:
            export_lora(final, config.lora, self.run.lora, self.family_name)
            if average is not None:
                export_lora(average, config.lora, self.run.lora_ema, self.family_name)
            # The card travels with the adapter folder: what it is, how it trained and how to load it.
            datasets = [config.data.shards] if config.data.shards else [s.shards for s in config.data.sources]
            training = {"learning rate": f"{config.optim.lr:g} ({config.optim.schedule}, {config.optim.warmup_steps} "
                                         "warm-up steps)",
                        "batch": f"{config.train.micro_batch_size} per rank x {config.train.grad_accum_steps} "
                                 f"accumulation x {summary['world_size']} ranks (ZeRO-{summary['zero_stage']})",
                        "seed": str(config.train.seed)}
            write_model_card(self.run.lora, run_card_facts(
                self.run, config.model.path, config.lora, summary, datasets, config.model.dtype, training,
                has_average=average is not None))
            write_atomic(self.run.summary, json.dumps(summary, indent=2) + "\n")
        except OSError as err:
            raise RankError(f"exporting the adapter failed: {describe_io_error(err, self.run.lora)}") from err
