"""The held-out loss: every rank's share of a held-out dataset, each sample at fixed timesteps with fixed noise, so
that the number moves only when the weights do (how a user sees over-fitting, which the noisy training loss hides).

Sample i belongs to rank i mod world_size. Every rank runs the same number of forwards (the last ones of a short
share count zero): under ZeRO-3 each forward gathers parameters from all ranks, so none may stop early.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.train.data.reader import BadSample, ShardIndex, collate
from cogvx_dist.train.step.loss import LossContext, diffusion_loss

EVAL_KEY = "eval/loss"
"""The metric of the mean held-out loss; `eval/loss_tNNN` holds the mean at timestep NNN."""


def eval_seed(seed: int, sample: int, timestep_number: int) -> int:
    """The seed of the generator that draws sample `sample`'s posterior sample and noise at its k-th timestep."""
    return (seed * 7_919 + sample * 104_729 + timestep_number * 1_299_709 + 17) % (2**63 - 1)


class HeldOutLoss:
    """One rank's part of the held-out evaluation."""

    def __init__(self, index: ShardIndex, timesteps: list[int], seed: int, rank: int, world_size: int,
                 counts_samples: bool = True) -> None:
        """`rank` of `world_size` data-parallel ranks; `counts_samples`: this rank counts its samples (one rank of
        each sequence-parallel group, whose ranks each add their part of every loss)."""
        self.index = index
        self.counts_samples = counts_samples
        self.timesteps = list(timesteps)
        self.seed = seed
        self.rank = rank
        self.forwards = math.ceil(len(index) / world_size)
        """Samples each rank evaluates (the same on every rank)."""
        self.mine = [rank + k * world_size for k in range(self.forwards)]
        """This rank's sample indices; those past the dataset stand in for a real one and count zero."""

    def local_sums(self, model: Any, context: LossContext, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[loss sum at each timestep..., samples counted]: this rank's share, to be summed over the ranks. Stays on
        the device: reading it would make the host wait."""
        sums = torch.zeros(len(self.timesteps) + 1, device=device)
        with torch.no_grad():
            for sample in self.mine:
                counts = sample < len(self.index)
                batch = self._batch(sample if counts else self.rank % len(self.index))
                for number, timestep in enumerate(self.timesteps):
                    generator = torch.Generator().manual_seed(eval_seed(self.seed, sample, number))
                    loss = diffusion_loss(model, batch, context, generator, device, dtype,
                                          timesteps=torch.tensor([timestep]))
                    if counts:
                        sums[number] += loss.float()
                sums[-1] += float(counts and self.counts_samples)
        return sums

    def _batch(self, sample: int) -> dict[str, Any]:
        try:
            tensors, _ = self.index.read(sample)
        except BadSample as err:
            raise CogvxError(f"data.eval_shards: {err}") from err
        return collate([tensors], [self.index.key(sample)])

    def values(self, summed: torch.Tensor) -> dict[str, float]:
        """The metrics from the sums over all ranks: the mean loss and the mean at each timestep."""
        totals = summed.tolist()
        count = totals[-1]
        per_timestep = {f"{EVAL_KEY}_t{t}": totals[k] / count for k, t in enumerate(self.timesteps)}
        return {EVAL_KEY: sum(totals[:-1]) / (count * len(self.timesteps)), **per_timestep}
