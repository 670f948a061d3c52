"""Prep to and from object storage.

Inputs: a video or image listed by URL (`s3://`, `gs://`, `http(s)://`) is fetched into a temporary local file by
the decode worker that decodes it, so downloads run in the decode pool, ahead of and beside encoding.

Output: with `--out` a URL, prep works in a local staging folder with the usual layout and mirrors it to the store
in an order that keeps the store consistent at every moment: a shard is uploaded under its final name when it is
complete (a multipart upload is completed only after its last part, so a crash leaves no object under that name)
and its local copy is dropped; a rank's progress file is uploaded after the shards it lists; the index and errors
file come next and manifest.json last. A resumed rank starts from the store's progress files and shard listing.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cogvx_dist.core import shard_format
from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.faults import fault_hook
from cogvx_dist.core.storage import UPLOAD_PART_BYTES, Store, is_url
from data_prep.decode import BadInput


@contextlib.contextmanager
def local_input(root: Path, name: str, options: dict | None = None) -> Iterator[Path]:
    """A local path for a listed input: the file under the dataset root, or a URL's temporary download."""
    if not is_url(name):
        yield root / name
        return
    parent, _, file_name = name.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="cogvx-input-") as folder:
        path = Path(folder) / (file_name.split("?")[0] or "input")  # keeps the suffix PyAV and PIL look at
        try:
            Store(parent, options).download(file_name, path)
        except CogvxError as err:
            raise BadInput(f"cannot fetch ({err})") from err
        yield path


def default_stage(url: str) -> Path:
    """Where shards of an output URL are written before upload, when --stage is not given."""
    return Path(tempfile.gettempdir()) / f"cogvx-prep-{hashlib.sha1(url.encode()).hexdigest()[:12]}"


class Publisher:
    """Mirrors a local staging folder to the output URL, in the order that keeps the store consistent."""

    def __init__(self, url: str, stage: Path, options: dict | None = None,
                 part_bytes: int = UPLOAD_PART_BYTES) -> None:
        self.store = Store(url, options)
        self.stage = stage
        self.part_bytes = part_bytes
        self.stage.mkdir(parents=True, exist_ok=True)
        self.uploaded_part = fault_hook("prep.uploaded_bytes")

    def pull_progress(self) -> dict[str, int]:
        """Copy the store's progress and error files into the stage (the store's are the truth); returns the
        complete shards the store holds, by name and size."""
        local_parts = self.stage / shard_format.PARTS_DIR
        local_parts.mkdir(parents=True, exist_ok=True)
        for stale in local_parts.iterdir():
            stale.unlink()
        for name in self.store.listing(shard_format.PARTS_DIR):
            self.store.download(f"{shard_format.PARTS_DIR}/{name}", local_parts / name)
        return {name: size for name, size in self.store.listing().items() if shard_format.SHARD_RE.match(name)}

    def shard(self, name: str) -> None:
        """Upload a complete shard under its final name, then drop the local copy."""
        path = self.stage / name
        self.store.upload(path, name, part_bytes=self.part_bytes, on_part=self.uploaded_part)
        path.unlink()

    def file(self, relative: str | Path) -> None:
        """Upload one small file of the stage (a progress or errors file) under the same relative name."""
        relative = Path(relative).relative_to(self.stage) if Path(relative).is_absolute() else Path(relative)
        self.store.upload(self.stage / relative, relative.as_posix())

    def delete(self, name: str) -> None:
        self.store.delete(name)

    def dataset(self) -> None:
        """The merged dataset files: index and errors first, the manifest last (its presence means complete)."""
        for name in (shard_format.INDEX_NAME, shard_format.ERRORS_NAME, shard_format.MANIFEST_NAME):
            self.file(name)
