"""The per-sample index of a dataset, part of the shard contract (shard_format.py): for every sample in manifest
order, its shard, its key, its digest and where its two members sit inside the shard file.

Since shard format version 2 it is stored as `index.safetensors` beside manifest.json, as flat arrays, so a rank
holding a million samples keeps about 90 bytes per sample and loads it in a fraction of a second, and a reader
fetches one sample with two ranged reads instead of scanning tar headers. Version 1 manifests list keys and
digests in JSON and no member offsets; `SampleIndex.from_entries` builds the same arrays from them, with the
offsets unknown until a reader scans that shard's tar headers (`tar_members`).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from cogvx_dist.core.errors import CogvxError, first_line
from cogvx_dist.core.files import sorted_safetensors_header

INDEX_NAME = "index.safetensors"
INDEX_FORMAT = "cogvx-sample-index"
UNKNOWN = -1
"""Member offset/length not recorded (version 1 manifests)."""
DIGEST_BYTES = 32


def member_row(offsets: dict[str, tuple[int, int]], key: str, tensors_ext: str, meta_ext: str) -> list[int]:
    """[tensors offset, tensors bytes, meta offset, meta bytes] of one sample from a shard's member table."""
    row = []
    for ext in (tensors_ext, meta_ext):
        row.extend(offsets.get(f"{key}.{ext}", (UNKNOWN, UNKNOWN)))
    return row


def tar_members(handle: IO[bytes] | str) -> dict[str, tuple[int, int]]:
    """(data offset, size) of each file member of a tar, from its headers only; a damaged or truncated tar gives
    the members before the damage."""
    members: dict[str, tuple[int, int]] = {}
    try:
        opened = tarfile.open(handle) if isinstance(handle, str) else tarfile.open(fileobj=handle)
        with opened as tar:
            for member in tar:
                if member.isfile():
                    members[member.name] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError):
        pass
    return members


@dataclass
class SampleIndex:
    """Every sample of a dataset as arrays, indexed by global sample index (manifest order)."""

    shard: torch.Tensor
    """int32 [N]: the sample's shard number (position in manifest.shards)."""
    members: torch.Tensor
    """int64 [N, 4]: tensors offset, tensors bytes, metadata offset, metadata bytes (UNKNOWN when not recorded)."""
    keys: torch.Tensor
    """uint8 [N, K]: the UTF-8 key, zero-padded."""
    digests: torch.Tensor
    """uint8 [N, 32]: sample_digest of each sample ([N, 0] when the manifest recorded none)."""
    num_shards: int
    """Shards in the manifest (a shard may hold no sample)."""

    def __post_init__(self) -> None:
        counts = torch.bincount(self.shard.long(), minlength=self.num_shards)
        self.shard_starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        """int64 [S+1]: first global index of each shard, then N."""

    def __len__(self) -> int:
        return int(self.shard.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory the arrays hold."""
        return sum(t.numel() * t.element_size() for t in (self.shard, self.members, self.keys, self.digests,
                                                           self.shard_starts))

    def key(self, index: int) -> str:
        return bytes(self.keys[index].numpy()).rstrip(b"\0").decode()

    def digest(self, index: int) -> str | None:
        """Hex sample digest, or None when the manifest recorded none."""
        return bytes(self.digests[index].numpy()).hex() if self.digests.shape[1] else None

    def shard_of(self, index: int) -> int:
        return int(self.shard[index])

    def shard_indices(self, shard_number: int) -> range:
        """Global indices of a shard's samples."""
        return range(int(self.shard_starts[shard_number]), int(self.shard_starts[shard_number + 1]))

    def keys_of(self, shard_number: int) -> list[str]:
        return [self.key(i) for i in self.shard_indices(shard_number)]

    def member(self, index: int) -> tuple[int, int, int, int]:
        return tuple(self.members[index].tolist())  # type: ignore[return-value]

    def has_offsets(self, shard_number: int) -> bool:
        indices = self.shard_indices(shard_number)
        return len(indices) == 0 or bool((self.members[indices.start:indices.stop] != UNKNOWN).all())

    def set_members(self, shard_number: int, rows: Sequence[Sequence[int]]) -> None:
        """Fill a shard's member offsets (found by scanning its tar headers)."""
        indices = self.shard_indices(shard_number)
        self.members[indices.start:indices.stop] = torch.tensor(rows, dtype=torch.long).view(-1, 4)

    @classmethod
    def from_entries(cls, entries: Sequence[Any]) -> SampleIndex:
        """From shard entries that list keys (and digests and member offsets where recorded), in shard order."""
        keys = [key.encode() for entry in entries for key in entry.keys]
        width = max((len(k) for k in keys), default=1)
        key_array = torch.zeros(len(keys), width, dtype=torch.uint8)
        for i, key in enumerate(keys):
            key_array[i, :len(key)] = torch.frombuffer(bytearray(key), dtype=torch.uint8)
        with_digests = bool(entries) and all(len(e.digests) == len(e.keys) for e in entries)
        digests = (torch.frombuffer(bytearray(b"".join(bytes.fromhex(d) for e in entries for d in e.digests)),
                                    dtype=torch.uint8).view(-1, DIGEST_BYTES)
                   if with_digests and keys else torch.zeros(len(keys), 0, dtype=torch.uint8))
        members = torch.full((len(keys), 4), UNKNOWN, dtype=torch.long)
        start = 0
        for entry in entries:
            if len(entry.members) == len(entry.keys) and entry.keys:
                members[start:start + len(entry.keys)] = torch.tensor(entry.members, dtype=torch.long)
            start += len(entry.keys)
        shard = torch.cat([torch.full((len(e.keys),), n, dtype=torch.int32) for n, e in enumerate(entries)]
                          or [torch.zeros(0, dtype=torch.int32)])
        return cls(shard, members, key_array, digests, len(entries))

    def to_bytes(self) -> bytes:
        """The index.safetensors file."""
        tensors = {"shard": self.shard, "members": self.members, "keys": self.keys, "digests": self.digests}
        # sorted: the same index gives the same bytes (and sha256 in the manifest) in every process
        return sorted_safetensors_header(save_safetensors_bytes(
            tensors, metadata={"format": INDEX_FORMAT, "samples": str(len(self))}))

    @classmethod
    def from_bytes(cls, data: bytes, where: str, samples: int, shards: int) -> SampleIndex:
        """Parse and check an index file that the manifest says holds `samples` samples in `shards` shards."""
        if not data:
            raise CogvxError(f"{where}: empty sample index")
        try:
            meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})
            tensors = load_safetensors_bytes(data)
        except Exception as err:  # any parse failure of stored bytes is one message naming the file
            raise CogvxError(f"{where}: not a readable sample index ({first_line(err)})") from err
        if meta.get("format") != INDEX_FORMAT or set(tensors) != {"shard", "members", "keys", "digests"}:
            raise CogvxError(f"{where}: not a cogvx sample index")
        if len(tensors["shard"]) > 1 and bool((tensors["shard"][1:] < tensors["shard"][:-1]).any()):
            raise CogvxError(f"{where}: samples are not in shard order")
        if len(tensors["shard"]) and int(tensors["shard"].max()) >= shards:
            raise CogvxError(f"{where}: names shard {int(tensors['shard'].max())} of a manifest with {shards}")
        keys = tensors["keys"]
        try:  # one pass over all keys: a bad byte would otherwise surface as a bare UnicodeDecodeError mid-run
            bytes(keys.numpy()).decode()
        except UnicodeDecodeError as err:
            raise CogvxError(f"{where}: sample key {err.start // max(1, keys.shape[1])} is not UTF-8 (the index is "
                             "damaged; rerun prep)") from err
        index = cls(tensors["shard"], tensors["members"], keys, tensors["digests"], shards)
        if len(index) != samples:
            raise CogvxError(f"{where}: holds {len(index)} samples, the manifest says {samples}")
        return index
