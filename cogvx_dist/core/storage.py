"""Where a dataset lives: a local folder or a URL prefix (`s3://`, `gs://`, `http(s)://`, anything fsspec knows),
read whole or by byte range, with transient errors retried.

Credentials come from each store's usual places (environment, profiles, instance roles, as fsspec's backends look
them up); storage options given in a config may tune the connection but never carry secrets, so none reach a run
folder or a log. Each process opens its own connection (fsspec drops cached filesystems after a fork), reused for
every read of that process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cogvx_dist.core.errors import CogvxError, first_line

UPLOAD_PART_BYTES = 64 << 20
"""Multipart part size for uploads (S3 allows 5 MiB to 5 GiB a part and 10,000 parts)."""

SECRET_OPTIONS = ("key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                  "aws_session_token", "session_token", "access_key", "secret_key", "credentials")
"""Storage options refused in configs: credentials belong in the environment or the store's profile files."""


def is_url(location: str | Path) -> bool:
    """A URL with a scheme other than file:// (a local path otherwise)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def check_storage_options(options: Any, where: str) -> None:
    """Refuse credentials in storage options at any depth (fsspec passes nested dicts on, e.g. s3fs's
    `client_kwargs` to boto), naming the key."""
    items = options.items() if isinstance(options, dict) else enumerate(options) if isinstance(options, list) else ()
    for name, value in items:
        if str(name).lower() in SECRET_OPTIONS:
            raise CogvxError(f"{where}.{name}: credentials do not go in the config (they would be copied into the run "
                             "folder); use the store's environment variables or profile")
        check_storage_options(value, f"{where}.{name}")


class Store:
    """Reads files under one location (a folder or a URL prefix)."""

    def __init__(self, location: str | Path, options: dict[str, Any] | None = None, retries: int = 4,
                 backoff_s: float = 0.5) -> None:
        self.location = str(location).rstrip("/") if is_url(location) else str(location)
        self.remote = is_url(location)
        self.options = dict(options or {})
        check_storage_options(self.options, "data.storage_options")
        self.retries = retries
        self.backoff_s = backoff_s
        self._fs: tuple[int, Any, str] | None = None

    def __getstate__(self) -> dict[str, Any]:  # loader workers open their own connection
        return {**self.__dict__, "_fs": None}

    def url(self, name: str) -> str:
        """Full location of a file under this store."""
        return f"{self.location}/{name}" if self.remote else str(Path(self.location) / name)

    def _filesystem(self) -> tuple[Any, str]:
        if self._fs is None or self._fs[0] != os.getpid():
            import fsspec

            try:
                # Not fsspec's shared instance: this Store's connection, made with the environment of now.
                fs, root = fsspec.core.url_to_fs(self.location, skip_instance_cache=True, **self.options)
            except (ImportError, ValueError) as err:
                raise CogvxError(f"{self.location}: cannot open this store ({first_line(err)})") from err
            self._fs = (os.getpid(), fs, root.rstrip("/"))
        return self._fs[1], self._fs[2]

    def read(self, name: str, offset: int | None = None, length: int | None = None) -> bytes:
        """A whole file, or `length` bytes from `offset`."""
        if not self.remote:
            path = Path(self.location) / name
            try:
                with open(path, "rb") as handle:
                    if offset is not None:
                        handle.seek(offset)
                    return handle.read() if length is None else handle.read(length)
            except FileNotFoundError as err:
                raise CogvxError(f"{path} does not exist") from err
        fs, root = self._filesystem()
        end = None if length is None else (offset or 0) + length
        return self._retry(name, lambda: fs.cat_file(f"{root}/{name}", start=offset, end=end))

    def open(self, name: str) -> Any:
        """A seekable binary file object (ranged reads underneath for a remote store)."""
        if not self.remote:
            return open(Path(self.location) / name, "rb")
        fs, root = self._filesystem()
        return self._retry(name, lambda: fs.open(f"{root}/{name}", "rb", block_size=1 << 16))

    def download(self, name: str, path: str | Path) -> None:
        """Copy one file of the store to a local path."""
        if not self.remote:
            raise CogvxError(f"{self.location} is local; read it in place")
        fs, root = self._filesystem()
        self._retry(name, lambda: fs.get_file(f"{root}/{name}", str(path)))

    def upload(self, path: str | Path, name: str, part_bytes: int = UPLOAD_PART_BYTES,
               on_part: Callable[[int], None] | None = None) -> None:
        """Copy a local file to `name`, where it appears whole or not at all: in parts of `part_bytes` (an S3
        multipart upload above one part), completed only after the last; a failure aborts the upload, and a
        process killed mid-way never completes it (`on_part(bytes sent)` runs after each part, for fault tests).
        """
        fs, root = self._filesystem()
        target = f"{root}/{name}"
        with open(path, "rb") as source:
            sink = self._retry(name, lambda: fs.open(target, "wb", block_size=part_bytes))
            try:
                sent = 0
                for chunk in iter(lambda: source.read(part_bytes), b""):
                    sink.write(chunk)
                    sent += len(chunk)
                    if on_part is not None:
                        on_part(sent)
                sink.close()
            except BaseException:
                sink.discard()  # aborts a multipart upload: nothing appears under the name
                raise

    def delete(self, name: str) -> None:
        fs, root = self._filesystem()
        self._retry(name, lambda: fs.rm_file(f"{root}/{name}"))

    def listing(self, prefix: str = "") -> dict[str, int]:
        """Size of every file directly under the location (or under its `prefix` folder), by name."""
        fs, root = self._filesystem()
        folder = f"{root}/{prefix}".rstrip("/")
        try:
            entries = self._retry(prefix, lambda: fs.ls(folder, detail=True, refresh=True))
        except CogvxError as err:
            if isinstance(err.__cause__, FileNotFoundError):
                return {}
            raise
        return {Path(e["name"]).name: int(e["size"]) for e in entries
                if e.get("type") == "file" and e.get("size") is not None}  # HTTP listings carry no sizes

    def sizes(self, names: list[str]) -> dict[str, int | None]:
        """Size of each named file (None: missing), with one listing where the store has listings."""
        if not self.remote:
            return {n: (p.stat().st_size if (p := Path(self.location) / n).is_file() else None) for n in names}
        fs, root = self._filesystem()
        try:
            listed = self.listing()
        except CogvxError:
            listed = {}  # no listing here (a plain web server): asked file by file below
        sizes: dict[str, int | None] = {}
        for name in names:
            if name in listed:
                sizes[name] = listed[name]
                continue
            try:
                sizes[name] = self._retry(name, lambda n=name: fs.size(f"{root}/{n}"))
            except CogvxError as err:
                if not isinstance(err.__cause__, FileNotFoundError):
                    raise
                sizes[name] = None
        return sizes

    def _retry(self, name: str, action: Any) -> Any:
        """Run a store call, retrying transient failures with exponential backoff; one-line errors naming the URL."""
        for attempt in range(self.retries + 1):
            try:
                return action()
            except FileNotFoundError as err:
                raise CogvxError(f"{self.url(name)} does not exist") from err
            except PermissionError as err:
                raise CogvxError(f"{self.url(name)}: access denied ({first_line(err)}); check the credentials the "
                                 "store's environment or profile provides") from err
            except Exception as err:  # network and service errors of any backend: retried, then one line
                if _is_credentials_error(err):
                    raise CogvxError(f"{self.url(name)}: no credentials found ({first_line(err)}); set them in the "
                                     "environment or the store's profile") from err
                if attempt == self.retries:
                    raise CogvxError(f"{self.url(name)}: unreachable after {self.retries + 1} tries "
                                     f"({first_line(err)})") from err
                time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")


def _is_credentials_error(err: BaseException) -> bool:
    names = {type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None}
    return bool(names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"})
