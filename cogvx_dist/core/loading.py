"""Loading CogVideoX components one at a time, from a diffusers-format folder or a hub id.

Components load in the CogVideoX order (tokenizer, text encoder, transformer, VAE, scheduler) and each on its
own: a training rank calls `load_transformer` and nothing else ever builds T5 or the VAE in that process.
`ComponentStore` holds components that are needed only for a while (the encoders in data prep) and releases each
one as soon as its outputs exist.
"""

from __future__ import annotations

import gc
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cogvx_dist.core.errors import CogvxError, first_line
from cogvx_dist.core.families import ModelFamily, detect_family
from cogvx_dist.core.files import read_json_object

COMPONENT_ORDER = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
COGVIDEOX_PIPELINES = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline")
TINY_INFO_FILE = "cogvx_tiny.json"
"""Written by `cogvx make-tiny-model` beside model_index.json: the tiny model's default frames and resolution."""

_CONFIG_FILE = {
    "tokenizer": ("tokenizer_config.json", "spiece.model", "tokenizer.json"),
    "text_encoder": ("config.json",),
    "transformer": ("config.json",),
    "vae": ("config.json",),
    "scheduler": ("scheduler_config.json",),
}
HUB_PROBE_TIMEOUT_S = 3.0
"""Seconds to wait for the hub's answer before taking a hub id from the local cache (huggingface_hub's own default,
10 s, then retries)."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is: where it lives, its family, and the video geometry it was trained for."""

    source: str
    """Local folder path or hub id, as passed to from_pretrained."""
    family: ModelFamily
    """The detected model family."""
    frames: int
    """Default number of frames."""
    height: int
    """Default pixel height."""
    width: int
    """Default pixel width."""
    transformer_config: dict[str, Any]
    """The transformer's config.json."""


def _is_local(source: str | os.PathLike) -> bool:
    text = str(source)
    return Path(text).exists() or not _HUB_ID.match(text)


def _check_local_folder(folder: Path, components: tuple[str, ...]) -> None:
    if not folder.is_dir():
        raise CogvxError(f"checkpoint folder {folder} does not exist")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise CogvxError(f"{folder} is not a diffusers CogVideoX checkpoint: model_index.json is missing")
    index = read_json_object(index_path)
    pipeline = index.get("_class_name")
    if pipeline not in COGVIDEOX_PIPELINES:
        raise CogvxError(f"{folder} is not a CogVideoX checkpoint: model_index.json names pipeline {pipeline!r}")
    for name in components:
        sub = folder / name
        if not sub.is_dir():
            raise CogvxError(f"{folder} has no {name}/ subfolder (needed for the {name})")
        if not any((sub / f).is_file() for f in _CONFIG_FILE[name]):
            raise CogvxError(f"{sub} holds none of {', '.join(_CONFIG_FILE[name])}")


def read_component_config(source: str | os.PathLike, subfolder: str) -> dict[str, Any]:
    """The config of one component (`tokenizer`, `text_encoder`, `transformer`, `vae`, `scheduler`), from a local
    folder (checked first, one-line errors) or a hub id, without loading weights."""
    source = str(source)
    if _is_local(source):
        _check_local_folder(Path(source), (subfolder,))
        return read_json_object(Path(source) / subfolder / _CONFIG_FILE[subfolder][0])
    path = _hub_file(source, f"{subfolder}/{_CONFIG_FILE[subfolder][0]}", f"{subfolder} config")
    return read_json_object(path, f"{source}'s {subfolder} config")


def _hub_file(repo_id: str, filename: str, what: str) -> str:
    """A file of a hub repository: downloaded, or from huggingface_hub's cache when the hub cannot be reached (or
    HF_HUB_OFFLINE is set). hf_hub_download alone, on a file it has not cached, retries an unreachable hub five
    times with backoff (~25 s, a warning line each) before failing; one HEAD request without retries asks first."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import HfHubHTTPError

    why_not: str | None = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    advice = "download it where the hub is reachable, or set model.path to a local folder"
    if why_not is None:
        try:  # retries are off by default here; a short timeout bounds a hub that does not answer
            get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=HUB_PROBE_TIMEOUT_S)
        except HfHubHTTPError as err:  # missing repo or file, gated, rate limit: the cache may still hold it
            why_not = f"the hub at {constants.ENDPOINT} answered {_two_lines(err)}"
            advice = "check the id and your access to it (HF_TOKEN), or set model.path to a local folder"
        except Exception as err:  # network errors of whichever HTTP client this huggingface_hub uses
            why_not = f"the hub at {constants.ENDPOINT} cannot be reached ({first_line(err)})"
    try:
        return hf_hub_download(repo_id, filename, local_files_only=why_not is not None)
    except Exception as err:  # network, auth, missing repo: all one user-facing line
        if why_not is None:
            raise CogvxError(f"cannot fetch {what} of {repo_id!r} from the hub: {first_line(err)}") from err
        raise CogvxError(f"cannot fetch {what} of {repo_id!r}: {why_not}, and huggingface_hub's cache "
                         f"({constants.HF_HUB_CACHE}) has no copy; {advice}") from err


def _two_lines(err: BaseException) -> str:
    """The first two non-empty lines of an error, in one: the hub's errors put the status on the first ("404 Client
    Error. (Request ID: ...)") and what it means on the next ("Repository Not Found for url: ...")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()][:2]
    return ": ".join(lines) or type(err).__name__


def describe_checkpoint(source: str | os.PathLike) -> CheckpointInfo:
    """Detect a checkpoint's family and default geometry from its configs, loading no weights."""
    source = str(source)
    transformer_config = read_component_config(source, "transformer")
    family = detect_family(transformer_config, where=f"{source}/transformer/config.json")
    frames, height, width = family.default_frames, family.default_height, family.default_width
    tiny_info = Path(source) / TINY_INFO_FILE
    if _is_local(source) and tiny_info.is_file():
        info = read_json_object(tiny_info)
        frames, height, width = info["frames"], info["height"], info["width"]
    return CheckpointInfo(source, family, frames, height, width, transformer_config)


def _from_pretrained(cls: Any, source: str, subfolder: str, **kwargs: Any) -> Any:
    if _is_local(source):
        _check_local_folder(Path(source), (subfolder,))
    try:
        return cls.from_pretrained(source, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        raise CogvxError(f"cannot load {subfolder} from {source}: {first_line(err)}") from err


def load_tokenizer(source: str | os.PathLike) -> Any:
    """The T5 tokenizer from `tokenizer/` (AutoTokenizer)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, str(source), "tokenizer")


def load_text_encoder(
    source: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The T5 encoder from `text_encoder/`, in eval mode with gradients off."""
    from transformers import T5EncoderModel

    model = _from_pretrained(T5EncoderModel, str(source), "text_encoder", dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def load_transformer(
    source: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The CogVideoXTransformer3DModel from `transformer/`; its family is checked first."""
    from diffusers import CogVideoXTransformer3DModel

    describe_checkpoint(source)  # fails with one line on an unknown family, before any weights load
    model = _from_pretrained(CogVideoXTransformer3DModel, str(source), "transformer", torch_dtype=dtype)
    return model.to(device)


def load_vae(
    source: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The AutoencoderKLCogVideoX from `vae/`, in eval mode with gradients off."""
    from diffusers import AutoencoderKLCogVideoX

    vae = _from_pretrained(AutoencoderKLCogVideoX, str(source), "vae", torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def load_scheduler(source: str | os.PathLike) -> Any:
    """The CogVideoXDPMScheduler from `scheduler/`."""
    from diffusers import CogVideoXDPMScheduler

    return _from_pretrained(CogVideoXDPMScheduler, str(source), "scheduler")


_LOADERS = {
    "tokenizer": lambda src, dtype, device: load_tokenizer(src),
    "text_encoder": load_text_encoder,
    "transformer": load_transformer,
    "vae": load_vae,
    "scheduler": lambda src, dtype, device: load_scheduler(src),
}


class ComponentStore:
    """Components loaded on demand and released as soon as their outputs exist (the "unload list").

    The store holds the only reference to each component it loads; callers use a component inside a function and
    then `unload` it, after which its memory (host or GPU) is returned.
    """

    def __init__(self, source: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        self.source = str(source)
        self.dtype = dtype
        self.device = device
        self._loaded: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        """The component `name`, loading it on first use."""
        if name not in _LOADERS:
            raise CogvxError(f"unknown component {name!r}; components: {', '.join(COMPONENT_ORDER)}")
        if name not in self._loaded:
            self._loaded[name] = _LOADERS[name](self.source, self.dtype, self.device)
        return self._loaded[name]

    def put(self, name: str, component: Any) -> None:
        """Hold a component built in memory (e.g. random full-size weights in a benchmark) as if it were loaded."""
        if name not in _LOADERS:
            raise CogvxError(f"unknown component {name!r}; components: {', '.join(COMPONENT_ORDER)}")
        self._loaded[name] = component

    def loaded(self) -> list[str]:
        """Names of the components currently held, in CogVideoX order."""
        return [name for name in COMPONENT_ORDER if name in self._loaded]

    def unload(self, *names: str) -> None:
        """Drop the named components and return their memory."""
        for name in names:
            self._loaded.pop(name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
