"""The training run on one rank: build the run, restore, make batches, then for each optimizer step: micro-batches
(loss, backward), one agreed loss, the update, log, maybe save; at the end export the adapter.

Everything a rank does is a function of (seed, step, micro-step, rank), so a resume is bit-exact and ranks agree
without talking; they still compare adapter checksums at start and end.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from cogvx_dist.core.config_files import to_dict
from cogvx_dist.core.devices import pick_device, torch_dtype
from cogvx_dist.core.errors import CogvxError, RankError
from cogvx_dist.core.faults import fault_hook
from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.launch_env import RankInfo
from cogvx_dist.core.loading import load_scheduler
from cogvx_dist.core.logs import rank_logger
from cogvx_dist.core.lora import adapter_checksum, export_lora, lora_parameters, lora_state_dict, state_dict_names
from cogvx_dist.core.run_folder import RunFolder
from cogvx_dist.train import checkpoints, engine
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.ds_config import zero_stage
from cogvx_dist.train.loss import LossContext, diffusion_loss
from cogvx_dist.train.metrics import MetricsWriter, SampleTrace, StepMeter
from cogvx_dist.train.model import build_model, forbid_encoders
from cogvx_dist.train.preflight import Preflight, preflight
from cogvx_dist.train.reader import BatchPlan, MicroBatches, make_loader
from cogvx_dist.train.schedule import lr_lambda
from cogvx_dist.train.streaming import StreamingMicroBatches


def train(config: RunConfig) -> dict[str, Any]:
    """Run training on this rank (called on every rank by the launcher); returns the run summary."""
    checks = preflight(config)
    forbid_encoders()
    ranks = engine.init_distributed()
    try:
        return Trainer(config, checks, ranks).fit()
    finally:
        engine.shutdown()


def step_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    """The seed of the generator that draws a micro-batch's posterior sample, noise and timesteps."""
    return (seed * 1_000_003 + step * 10_007 + micro_step * 101 + rank) % (2**63 - 1)


class Trainer:
    """One rank's training run."""

    def __init__(self, config: RunConfig, checks: Preflight, ranks: RankInfo) -> None:
        self.config = config
        self.checks = checks
        self.ranks = ranks
        self.run = RunFolder(config.output_dir)
        self.log = rank_logger("cogvx.train", ranks.rank)
        self.device = torch.device(pick_device("auto", ranks.local_rank))
        self.dtype = torch_dtype(config.model.dtype)
        self.global_batch = config.check_world(ranks.world_size)
        self.family = checks.checkpoint.family
        self.committed_fault = fault_hook("train.committed")

    def fit(self) -> dict[str, Any]:
        """Train from the resume point to train.max_steps; returns the run summary."""
        config = self.config
        self._write_run_files()
        self._build()
        start_step, position = self._restore()
        loader = self._micro_batches(start_step, position)
        geometry = self.checks.manifest
        meter = StepMeter(self.global_batch, self.family.tokens_per_sample(geometry.frames, geometry.height,
                                                                           geometry.width), self.device)
        metrics = MetricsWriter(self.run.root, enabled=self.ranks.is_main, tensorboard=config.log.tensorboard)
        trace = SampleTrace(self.run.root, self.ranks.rank) if config.log.sample_trace else None
        progress = self._progress_bar(start_step)
        self.engine.train()
        for step in range(start_step + 1, config.train.max_steps + 1):
            lr = self.engine.lr()  # the rate this step's update uses
            meter.step_done(self.train_step(step, loader, meter, trace))
            position += self.global_batch
            progress.update(1)
            if step % config.log.every_steps == 0 or step == config.train.max_steps:
                values = meter.values(lr, self.engine.grad_norm(), position)
                metrics.log(step, values)
                progress.set_postfix(loss=f"{values['loss']:.4f}", samples_s=f"{values['samples_per_s']:.2f}")
            if step % config.checkpoint.every_steps == 0 or step == config.train.max_steps:
                self.save(step, position)
        progress.close()
        metrics.close()
        if trace is not None:
            trace.close()
        return self._finish(start_step, position)

    def train_step(self, step: int, loader: Any, meter: StepMeter, trace: SampleTrace | None) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the loss averaged over micro-batches and
        ranks, as a tensor (reading it would wait for the device). All ranks agree the loss is finite before the
        update: that agreement is the step's one host sync."""
        accumulation = self.config.train.grad_accum_steps
        losses = []
        for micro_step in range(accumulation):
            batch = meter.next_batch(loader)
            if trace is not None:
                trace.write(step, micro_step, batch["keys"])
            seed = step_seed(self.config.train.seed, step, micro_step, self.ranks.rank)
            loss = diffusion_loss(self.engine, batch, self.context, torch.Generator().manual_seed(seed), self.device,
                                  self.dtype)
            self.engine.backward(loss)
            losses.append(loss.detach())
            if micro_step < accumulation - 1:
                self.engine.step()
        mean_loss = self._agreed_loss(torch.stack(losses).mean(), step)
        self.engine.step()
        return mean_loss

    def _agreed_loss(self, local_loss: torch.Tensor, step: int) -> torch.Tensor:
        """The all-ranks mean of the step's loss; every rank stops if any rank's loss is not finite."""
        not_finite = (~torch.isfinite(local_loss)).float()
        reduced = engine.all_reduce_sum(torch.stack([local_loss.float(), not_finite]))
        if reduced[1].item() > 0:
            raise CogvxError(f"non-finite loss at step {step}; the last complete checkpoint is intact")
        return reduced[0] / self.ranks.world_size

    def _write_run_files(self) -> None:
        if self.ranks.is_main:
            self.run.root.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run.run_config, json.dumps(to_dict(self.config), indent=2) + "\n")
            write_atomic(self.run.ds_config, json.dumps(self.checks.ds_config, indent=2) + "\n")
        self.log.info("%d ranks on %s, %s, ZeRO-%d, global batch %d, %d samples (%s)", self.ranks.world_size,
                      self.device.type, self.config.model.dtype, zero_stage(self.checks.ds_config), self.global_batch,
                      self.checks.manifest.num_samples, self.family.name)

    def _build(self) -> None:
        """Model with identical adapters on every rank (checked), the loss context, the engine."""
        config = self.config
        transformer = build_model(config.model.path, config.model.dtype, config.lora, config.train.seed,
                                  config.model.gradient_checkpointing)
        self.lora_names = sorted(lora_parameters(transformer))
        checksums = engine.all_gather_object(adapter_checksum(lora_state_dict(transformer)))
        if len(set(checksums)) != 1:
            raise RankError(f"LoRA adapters differ across ranks at start-up (checksums {checksums}); "
                            "check that every node runs the same cogvx, torch and peft versions")
        self.context = LossContext(self.family, self.checks.checkpoint.transformer_config,
                                   load_scheduler(config.model.path))
        self.engine = engine.Engine(transformer, self.checks.ds_config,
                                    lr_lambda(config.optim, config.train.max_steps))

    def _restore(self) -> tuple[int, int]:
        """(optimizer step, stream position) to start from: the resume checkpoint's, or (0, 0)."""
        resume_from = checkpoints.find_resume_point(self.config.output_dir, self.config.checkpoint.resume)
        if resume_from is None:
            return 0, 0
        committed = checkpoints.read_commit(resume_from)
        step, position, saved_world = int(committed["step"]), int(committed["position"]), committed["world_size"]
        if saved_world == self.ranks.world_size:
            self.engine.load(resume_from)
        else:
            # DeepSpeed's ZeRO partitions are bound to the world size; our whole-tensor copy of the weights is not.
            self.log.warning("world size changed (%d -> %d): restoring weights, LR schedule and sample position; "
                             "Adam moments restart from zero", saved_world, self.ranks.world_size)
            weights, _ = checkpoints.read_master_weights(resume_from)
            self.engine.restore_weights(weights, step)
        self.log.info("resumed from %s: step %d, sample position %d (saved with %d ranks, now %d)", resume_from,
                      step, position, saved_world, self.ranks.world_size)
        if step >= self.config.train.max_steps:
            self.log.info("nothing to do: step %d >= train.max_steps %d", step, self.config.train.max_steps)
        return step, position

    def _micro_batches(self, start_step: int, position: int) -> Any:
        """This rank's micro-batches from the stream position on (local shards), or a streamed draw."""
        config = self.config
        if self.checks.index is not None:
            plan = BatchPlan(config.train.micro_batch_size, config.train.grad_accum_steps, self.ranks.rank,
                             self.ranks.world_size)
            steps_left = max(0, config.train.max_steps - start_step)
            batches = MicroBatches(self.checks.index, plan, config.train.seed, position, steps_left)
        else:
            batches = StreamingMicroBatches(config.data.shards, self.checks.manifest, config.train.micro_batch_size,
                                            config.train.seed, self.ranks.rank, start_step)
        return iter(make_loader(batches, config.data.num_workers))

    def _progress_bar(self, start_step: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=self.config.train.max_steps, initial=start_step, desc="train", unit="step",
                    disable=not (self.ranks.is_main and self.config.log.progress_bar), dynamic_ncols=True)

    def save(self, step: int, position: int) -> None:
        """Collective: checkpoint the engine, export the adapter and a whole-weight copy, then commit and prune."""
        folder = self.run.checkpoint(step)
        state = {"step": step, "position": position, "seed": self.config.train.seed,
                 "world_size": self.ranks.world_size,
                 "rng": "noise, timesteps and order derive from (seed, step, micro-step, rank); nothing to restore"}
        self.engine.save(folder, state)
        masters = self.engine.gather_weights(self.lora_names)
        adapter = state_dict_names(masters)
        if self.ranks.is_main:
            export_lora(adapter, self.config.lora, folder / self.run.lora.name, self.family.name)
            checkpoints.write_master_weights(folder, masters, {"step": step, "position": position})
        engine.barrier()
        if self.ranks.is_main:
            checkpoints.commit(folder, {**state, "adapter_checksum": adapter_checksum(adapter)})
            checkpoints.prune(self.config.output_dir, self.config.checkpoint.keep_last)
        engine.barrier()
        if self.committed_fault:
            self.committed_fault(step)

    def _finish(self, start_step: int, position: int) -> dict[str, Any]:
        """Check the ranks ended with the same adapter, export it and write the summary."""
        final = state_dict_names(self.engine.gather_weights(self.lora_names))
        final_checksums = engine.all_gather_object(adapter_checksum(final))
        if len(set(final_checksums)) != 1:
            raise RankError(f"adapters differ across ranks after training: {final_checksums}")
        summary = {
            "steps": self.config.train.max_steps,
            "resumed_from_step": start_step,
            "samples_seen": position,
            "world_size": self.ranks.world_size,
            "zero_stage": zero_stage(self.checks.ds_config),
            "adapter_checksums": final_checksums,
            "family": self.family.name,
        }
        if self.ranks.is_main:
            export_lora(final, self.config.lora, self.run.lora, self.family.name)
            write_atomic(self.run.summary, json.dumps(summary, indent=2) + "\n")
            self.log.info("done: %d steps, adapter %s, exported to %s", self.config.train.max_steps,
                          final_checksums[0][:12], self.run.lora)
        return summary

