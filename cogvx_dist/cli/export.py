"""`cogvx export RUN [--format diffusers|comfyui]`: a run's adapter as a file another tool loads.

    cogvx export RUN                      the diffusers file the run wrote (RUN/lora/pytorch_lora_weights.safetensors)
    cogvx export RUN --format comfyui     one file for core ComfyUI's LoRA loaders, beside it (lora_comfyui.safetensors)
    cogvx export RUN --step 400 --out F   a committed checkpoint's adapter instead (--ema: the moving average)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cogvx_dist.core.errors import CogvxError

FORMATS = ("diffusers", "comfyui")


def configure(export: argparse.ArgumentParser, name: str = "export") -> None:
    """Arguments and handler of `cogvx export`."""
    export.set_defaults(handler=run)
    export.add_argument("run", metavar="RUN",
                        help="training output_dir, or an exported adapter folder or its safetensors file")
    export.add_argument("--format", choices=FORMATS, default="diffusers",
                        help="diffusers (default: what the run exports) or comfyui (core ComfyUI's LoRA loaders)")
    source = export.add_mutually_exclusive_group()
    source.add_argument("--step", type=int, help="the adapter of this committed checkpoint instead of the final one")
    source.add_argument("--ema", action="store_true", help="the final moving average (lora_ema/) instead")
    export.add_argument("--out", help="where to write: the file for comfyui (default: beside the source adapter, "
                                      "lora_comfyui.safetensors), a folder for diffusers (default: none, the run's "
                                      "file is the export)")


def run(args: argparse.Namespace) -> int:
    from cogvx_dist.core.lora import COMFYUI_WEIGHTS_NAME, export_comfyui_lora, export_lora, load_exported_lora

    folder = adapter_source(Path(args.run), args.step, args.ema)
    adapter = load_exported_lora(folder)
    if args.format == "comfyui":
        out = Path(args.out) if args.out else adapter.file.parent / COMFYUI_WEIGHTS_NAME
        if out.is_dir():
            out = out / COMFYUI_WEIGHTS_NAME
        written = export_comfyui_lora(adapter, out)
        print(f"{written}  (ComfyUI: put it in models/loras/ and apply it with LoraLoaderModelOnly, strength 1.0)")
        return 0
    if not args.out:
        print(f"{adapter.file}  (already in the diffusers format)")
        return 0
    print(export_lora(adapter.state, adapter.settings, args.out, adapter.family))
    return 0


def adapter_source(path: Path, step: int | None, ema: bool) -> Path:
    """The adapter folder or file to export: `path` itself when it is one, else a run folder's final adapter, its
    average (`ema`) or a committed checkpoint's (`step`); a one-line error when there is none."""
    from cogvx_dist.core.lora import LORA_WEIGHTS_NAME
    from cogvx_dist.core.run_folder import RunFolder, is_committed

    if not path.exists():
        raise CogvxError(f"{path} does not exist")
    if path.is_file() or (path / LORA_WEIGHTS_NAME).is_file():
        if step is not None or ema:
            raise CogvxError(f"{path} is an adapter, not a run folder: --step and --ema pick from a run")
        return path
    run = RunFolder(path)
    if step is not None:
        folder = run.checkpoint(step)
        if not is_committed(folder):
            steps = ", ".join(str(s) for s, _ in run.complete_checkpoints()) or "none"
            raise CogvxError(f"{path} has no committed checkpoint at step {step} (committed: {steps})")
        return folder / run.lora.name
    chosen = run.lora_ema if ema else run.lora
    if not (chosen / LORA_WEIGHTS_NAME).is_file():
        steps = [str(s) for s, _ in run.complete_checkpoints()]
        hint = f"; export a checkpoint with --step ({', '.join(steps)})" if steps else ""
        what = "moving average (train.ema_decay)" if ema else "final adapter (training has not finished)"
        raise CogvxError(f"{path} holds no {what}: no {chosen / LORA_WEIGHTS_NAME}{hint}")
    return chosen
