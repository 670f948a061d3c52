"""An exponential moving average of the adapter (train.ema_decay), sharded over the ranks as ZeRO-3 shards
parameters: each parameter, flattened and padded to a multiple of the world size, is cut into one equal chunk per
rank, and a rank keeps the fp32 average of its chunks only (1/world of the adapter). The average follows the weights
the forward pass uses (the compute copies), one update per optimizer step: ema <- decay * ema + (1 - decay) * w.

A checkpoint holds the whole average (gathered, exported as an adapter), so a resume on any number of ranks takes
its chunks from there bit-exactly.
"""

from __future__ import annotations

import torch

from cogvx_dist.train import engine
from cogvx_dist.train.engine import partition_size


class AdapterEMA:
    """One rank's chunks of the moving average, in the order of `names`."""

    def __init__(self, decay: float, shapes: dict[str, torch.Size], rank: int, world_size: int) -> None:
        self.decay = decay
        self.names = sorted(shapes)
        self.shapes = shapes
        self.sizes = {name: partition_size(shape.numel(), world_size) for name, shape in shapes.items()}
        """Elements of this rank's (padded) chunk of each parameter."""
        self.rank = rank
        self.world_size = world_size
        self.chunks: list[torch.Tensor] = []

    def start(self, chunks: list[torch.Tensor]) -> None:
        """Begin at the current weights (this rank's chunks, as `Engine.local_chunks` gives them; one shorter than
        its padded size leaves the padding zero)."""
        self.chunks = []
        for name, chunk in zip(self.names, chunks):
            average = torch.zeros(self.sizes[name], dtype=torch.float32, device=chunk.device)
            average[:chunk.numel()] = chunk.detach()
            self.chunks.append(average)

    def update(self, chunks: list[torch.Tensor]) -> None:
        """Fold in the weights after an optimizer step (in place: no copy of the weights on this hot path)."""
        with torch.no_grad():
            for average, chunk in zip(self.chunks, chunks):
                average[:chunk.numel()].mul_(self.decay).add_(chunk, alpha=1.0 - self.decay)

    def gather(self) -> dict[str, torch.Tensor]:
        """Collective: the whole average by parameter name, on the CPU (every rank gets it)."""
        flat = torch.cat([chunk.view(-1) for chunk in self.chunks])
        per_rank = engine.all_gather_tensor(flat)
        whole, offset = {}, 0
        for name in self.names:
            numel, size = self.shapes[name].numel(), self.sizes[name]
            pieces = [flat_of_rank[offset:offset + size].cpu() for flat_of_rank in per_rank]
            whole[name] = torch.cat(pieces)[:numel].view(self.shapes[name]).clone()
            offset += size
        return whole

    def restore(self, whole: dict[str, torch.Tensor], like: list[torch.Tensor]) -> None:
        """Take this rank's chunks of a whole average read back from a checkpoint (each on the device of the weight
        chunk in `like`)."""
        self.chunks = []
        for name, device in zip(self.names, [chunk.device for chunk in like]):
            numel, size = self.shapes[name].numel(), self.sizes[name]
            padded = torch.zeros(size * self.world_size, dtype=torch.float32)
            padded[:numel] = whole[name].reshape(-1).float()
            self.chunks.append(padded[self.rank * size:(self.rank + 1) * size].to(device).clone())
