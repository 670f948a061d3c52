"""The exported adapter's model card: `README.md` beside `pytorch_lora_weights.safetensors`, in the Hugging Face
convention (a YAML header the Hub reads, then Markdown), so the folder says what it is wherever it is copied or
pushed: the base model, the LoRA's shape, how long it trained, how prompts were written, and how to load it.

`model_card` turns `CardFacts` into text and does no I/O; `run_card_facts` gathers the facts a finished run holds
(its settings, summary, dataset manifests and validation record); `write_model_card` writes the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.lora import LORA_WEIGHTS_NAME, LoraSettings
from cogvx_dist.core.run_folder import MODEL_CARD, RunFolder

ADAPTER_NAME = "cogvx"
"""The adapter name the loading snippet gives `load_lora_weights`, so `set_adapters` can name it."""
PLAIN_TEMPLATE = "{prompt}"
"""The prompt template of a dataset whose captions were encoded as they are (no trigger word)."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LICENSES = {
    "thudm/cogvideox-2b": {"license": "apache-2.0"},
    **{hub.lower(): {"license": "other", "license_name": "cogvideox-license",
                     "license_link": f"https://huggingface.co/{hub}/blob/main/LICENSE"}
       for hub in ("THUDM/CogVideoX-5b", "THUDM/CogVideoX-5b-I2V", "THUDM/CogVideoX1.5-5B",
                   "THUDM/CogVideoX1.5-5B-I2V")},
}
"""The licence of each official base checkpoint, by lowercase hub id; the card of an adapter on any other base
names none (a fine-tune's licence is its author's to state)."""


@dataclass
class ValidationClip:
    """The newest clip `cogvx sample --watch` made with a checkpoint of this run."""

    step: int
    prompt: str
    mp4: str
    """Its path relative to the adapter folder."""
    grid: str
    """Its frame-grid PNG, relative to the adapter folder."""


@dataclass
class CardFacts:
    """Everything the card says, gathered once training finished."""

    base_model: str
    """model.path as the run was configured: a hub id or a local diffusers folder."""
    family: str
    """The CogVideoX family it was trained on (e.g. CogVideoX-5b)."""
    lora: LoraSettings
    steps: int
    """Optimizer steps the adapter was trained for (train.max_steps)."""
    samples_seen: int
    """Samples of the dataset stream consumed, over all ranks."""
    adapter_folder: str
    """Where the adapter was exported: the snippet loads it from here."""
    pipeline_class: str = "CogVideoXPipeline"
    image_to_video: bool = False
    fps: int = 8
    dtype: str = "bfloat16"
    """The compute dtype it was trained in (model.dtype): the snippet samples in it too."""
    prompt_templates: list[str] | None = field(default_factory=lambda: [PLAIN_TEMPLATE])
    """How the datasets' captions were encoded ("{prompt}": as they are); None where a manifest was not readable."""
    training: dict[str, str] = field(default_factory=dict)
    """Further settings worth a row in the card (learning rate, seed, ranks, ...), in the order given."""
    average_folder: str = ""
    """The adapter's moving average (train.ema_decay) beside it, relative to the adapter folder; "": none."""
    validation: ValidationClip | None = None


def is_hub_id(model: str) -> bool:
    """True for "org/name" that is not a local folder: what the Hub's base_model field can link to."""
    return not Path(model).exists() and bool(_HUB_ID.match(model))


def trigger_text(template: str) -> str:
    """What a prompt template adds around the caption ("<sks> {prompt}" -> "<sks>"); "" for the plain template."""
    return template.replace(PLAIN_TEMPLATE, " ").strip(" ,;:.") if template != PLAIN_TEMPLATE else ""


def card_header(facts: CardFacts) -> dict[str, Any]:
    """The YAML header: the fields the Hub indexes (base model, library, pipeline, tags, licence, trigger)."""
    task = "image-to-video" if facts.image_to_video else "text-to-video"
    header: dict[str, Any] = {"base_model": facts.base_model, "library_name": "diffusers", "pipeline_tag": task}
    header.update(_LICENSES.get(facts.base_model.lower(), {}))
    header["tags"] = [task, "diffusers", "lora", "cogvideox", facts.family.lower(), "template:diffusion-lora"]
    triggers = sorted({trigger_text(t) for t in facts.prompt_templates or []} - {""})
    if len(triggers) == 1:  # the Hub's widget puts instance_prompt into prompts; with several it cannot choose
        header["instance_prompt"] = triggers[0]
    return header


def model_card(facts: CardFacts) -> str:
    """The card's whole text: YAML header, then what was trained, how prompts were written, and how to load it."""
    import yaml

    lora = facts.lora
    title = Path(facts.adapter_folder).parent.name or "adapter"
    rows = [("model family", facts.family), ("base model", f"`{facts.base_model}`"),
            ("LoRA rank / alpha", f"{lora.rank} / {lora.alpha:g} (scale alpha / rank = {lora.scale:g})"),
            ("target modules", ", ".join(f"`{m}`" for m in lora.target_modules)),
            *([("LoRA dropout", f"{lora.dropout:g}")] if lora.dropout else []),
            ("steps trained", str(facts.steps)), ("samples seen", f"{facts.samples_seen:,}"),
            *([("started from", f"`{lora.init_from}`")] if lora.init_from else []),
            *facts.training.items()]
    lines = ["---", yaml.safe_dump(card_header(facts), sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {facts.family} LoRA: {title}", "",
             f"A LoRA adapter for the {facts.family} transformer, trained with cogvx-dist (DeepSpeed) and exported in "
             f"the diffusers format (`{LORA_WEIGHTS_NAME}`, with its PEFT config in the file's metadata).", ""]
    if not is_hub_id(facts.base_model):
        lines += [f"The base model is a local checkpoint. Before pushing this folder to the Hub, set `base_model` "
                  f"above to the hub id it came from (the official {facts.family} weights are "
                  f"`{_official_hub_id(facts.family)}`).", ""]
    lines += ["## Training", "", "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    lines += _prompt_section(facts.prompt_templates)
    lines += _loading_section(facts)
    lines += _validation_section(facts.validation)
    return "\n".join(lines)


def _official_hub_id(family: str) -> str:
    from cogvx_dist.core.errors import CogvxError
    from cogvx_dist.core.families import get_family

    try:
        return get_family(family).hub_id
    except CogvxError:  # a family this version does not know: the card still says what it can
        return family


def _prompt_section(templates: list[str] | None) -> list[str]:
    """Trigger words and the caption template the training prompts were encoded with."""
    lines = ["## Prompts", ""]
    if templates is None:
        return lines + ["The datasets' prompt templates could not be read when the adapter was exported (remote "
                        "shards): see `prompt_template` in their manifest.json.", ""]
    special = sorted(set(templates) - {PLAIN_TEMPLATE})
    if not special:
        return lines + ["Trigger words: none. The captions were encoded as they are (template `{prompt}`): prompt "
                        "it as you would the base model.", ""]
    for template in special:
        lines.append(f"- trigger words `{trigger_text(template)}`: the captions were encoded as `{template}`, e.g. "
                     f"`{template.replace(PLAIN_TEMPLATE, 'a corgi runs along a beach')}`")
    if PLAIN_TEMPLATE in templates:
        lines.append("- some datasets' captions were encoded as they are (template `{prompt}`)")
    return lines + ["", "Write prompts the same way to call up what the adapter learned.", ""]


def _loading_section(facts: CardFacts) -> list[str]:
    """A snippet that loads the base pipeline and this adapter at its trained strength, then samples a clip."""
    lora = facts.lora
    image = facts.image_to_video
    # A prompt it was validated with, else an example written the way the training captions were.
    template = next((t for t in facts.prompt_templates or [] if t != PLAIN_TEMPLATE), PLAIN_TEMPLATE)
    prompt = facts.validation.prompt if facts.validation else \
        template.replace(PLAIN_TEMPLATE, "a corgi runs along a beach at sunset")
    code = [
        "import torch",
        f"from diffusers import {facts.pipeline_class}",
        "from diffusers.utils import export_to_video" + (", load_image" if image else ""),
        "",
        f"pipe = {facts.pipeline_class}.from_pretrained({_py(facts.base_model)}, torch_dtype=torch.{facts.dtype})",
        f"pipe.load_lora_weights({_py(facts.adapter_folder)}, adapter_name={_py(ADAPTER_NAME)})  # or the hub id "
        "you pushed this folder to",
        f"# 1.0 applies the adapter as trained: diffusers reads lora_alpha from the file and scales by alpha / rank "
        f"({lora.alpha:g} / {lora.rank}).",
        f"pipe.set_adapters([{_py(ADAPTER_NAME)}], [1.0])",
        'pipe.to("cuda")',
        "",
        f"prompt = {_py(prompt)}",
        *(['image = load_image("first_frame.png")'] if image else []),
        f"video = pipe({'image=image, ' if image else ''}prompt=prompt, num_inference_steps=50, "
        "guidance_scale=6.0).frames[0]",
        f'export_to_video(video, "output.mp4", fps={facts.fps})',
    ]
    lines = ["## Use it with diffusers", "", "```python", *code, "```", "",
             "A weight below 1.0 in `set_adapters` weakens the adapter, above 1.0 strengthens it; "
             "`pipe.fuse_lora()` merges it into the weights for faster sampling.", ""]
    if facts.average_folder:
        lines += [f"The adapter's moving average (train.ema_decay) is in `{facts.average_folder}`, in the same format: "
                  "load that folder the same way.", ""]
    return lines


def _py(text: str) -> str:
    """`text` as a double-quoted Python string literal (JSON's escapes are Python's), as the rest of the snippet."""
    return json.dumps(text, ensure_ascii=False)


def _validation_section(clip: ValidationClip | None) -> list[str]:
    """The newest validation clip, linked relative to this folder (inside the run folder)."""
    if clip is None:
        return ["## Validation", "", "No validation clips existed when the adapter was exported; `cogvx sample "
                "--watch RUN --prompt ...` writes them to RUN/validation/.", ""]
    return ["## Validation", "", f"Sampled with the checkpoint of step {clip.step}, prompt “{clip.prompt}” "
            f"([mp4]({clip.mp4}); paths relative to this folder in its run folder):", "",
            f"![frames of the validation clip at step {clip.step}]({clip.grid})", ""]


def run_card_facts(run: RunFolder, model: str, lora: LoraSettings, summary: dict[str, Any],
                   datasets: Sequence[str], dtype: str, training: dict[str, str] | None = None,
                   has_average: bool = False) -> CardFacts:
    """The facts of a finished run: its settings, its summary (family, steps, samples seen), the prompt templates of
    its datasets' manifests and the newest clip of its validation record."""
    from cogvx_dist.core.families import get_family

    family = get_family(summary["family"])
    return CardFacts(
        base_model=model, family=family.name, lora=lora, steps=int(summary["steps"]),
        samples_seen=int(summary["samples_seen"]), adapter_folder=str(run.lora.resolve()),
        pipeline_class=family.pipeline_class, image_to_video=family.image_to_video, fps=family.fps, dtype=dtype,
        prompt_templates=prompt_templates(datasets), training=dict(training or {}),
        average_folder=f"../{run.lora_ema.name}/" if has_average else "", validation=newest_validation(run))


def prompt_templates(datasets: Sequence[str]) -> list[str] | None:
    """The prompt template of each dataset, read from its local manifest.json; None where one is remote or not
    readable (the card then says so: a network read must not hold up or fail the end of a finished run)."""
    from cogvx_dist.core.shard_format import MANIFEST_NAME

    found = []
    for location in datasets:
        manifest = Path(location) / MANIFEST_NAME
        try:
            found.append(str(json.loads(manifest.read_text()).get("prompt_template") or PLAIN_TEMPLATE))
        except (OSError, ValueError, AttributeError):
            return None
    return found


def newest_validation(run: RunFolder) -> ValidationClip | None:
    """The first clip of the newest validated step in the run's validation record, if any."""
    try:
        steps = json.loads(run.validation_record.read_text()).get("steps") or {}
        step, entry = max(((int(s), e) for s, e in steps.items() if e.get("clips")), key=lambda item: item[0])
        clip, folder = entry["clips"][0], f"../{run.validation.name}/{entry['folder']}"
        return ValidationClip(step=step, prompt=str(clip["prompt"]), mp4=f"{folder}/{clip['mp4']}",
                              grid=f"{folder}/{clip['grid']}")
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None  # no record yet (validation runs beside training, often after it), or one being rewritten


def write_model_card(folder: str | Path, facts: CardFacts) -> Path:
    """Write the card as README.md in the adapter folder (atomically: a watcher may copy the folder meanwhile)."""
    return write_atomic(Path(folder) / MODEL_CARD, model_card(facts))
