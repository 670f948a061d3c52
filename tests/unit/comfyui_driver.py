"""Runs inside a ComfyUI environment (its checkout on sys.path, its own Python): builds ComfyUI's CogVideoX model
from a transformer's weights in ComfyUI's names, applies a LoRA file through ComfyUI's own loader and writes back
what ComfyUI made of it. `tests/unit/test_comfyui.py` starts it as a separate process and checks the results; it
imports nothing of cogvx (ComfyUI's environment need not have it).

    python comfyui_driver.py COMFYUI_DIR JOB.json

JOB.json: base (safetensors, ComfyUI names), config (the diffusers transformer config), lora, strength, inputs
(safetensors: x, timestep, context[, ofs]), out (safetensors to write), report (JSON to write).
"""

from __future__ import annotations

import json
import logging
import sys


class _Warnings(logging.Handler):
    """Every warning ComfyUI logs while it loads (a LoRA key it did not take is one)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main(comfyui_dir: str, job_file: str) -> None:
    sys.path.insert(0, comfyui_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils
    import torch
    from safetensors.torch import load_file, save_file

    job = json.loads(open(job_file).read())
    warnings = _Warnings()
    logging.getLogger().addHandler(warnings)
    base = load_file(job["base"])
    config = job["config"]
    unet_config = comfy.model_detection.detect_unet_config(base, "")
    # ComfyUI's detector assumes the released models' 64-wide heads and their training sizes; a tiny model has
    # neither, so they come from the model's own config (the rest is detected from the weights).
    for key in ("num_attention_heads", "attention_head_dim", "sample_height", "sample_width", "sample_frames",
                "max_text_seq_length", "spatial_interpolation_scale", "temporal_interpolation_scale"):
        unet_config[key] = config[key]
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, base)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(base, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    model.load_model_weights(dict(base), "")
    lora = comfy.utils.load_torch_file(job["lora"], safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)), key_map)
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, job["strength"], 0.0)
    inputs = load_file(job["inputs"])
    extra = {"ofs": inputs["ofs"]} if "ofs" in inputs else {}
    with torch.no_grad():
        plain = model.diffusion_model(inputs["x"], inputs["timestep"], inputs["context"], **extra)
        patched.patch_model(device_to=torch.device("cpu"))
        adapted = model.diffusion_model(inputs["x"], inputs["timestep"], inputs["context"], **extra)
    weights = {f"weight/{k}": v.detach().float().contiguous() for k, v in model.diffusion_model.state_dict().items()}
    save_file({**weights, "out/plain": plain.float().contiguous(), "out/adapted": adapted.float().contiguous()},
              job["out"])
    report = {"model_config": type(model_config).__name__, "model": type(model).__name__,
              "patched_weights": sorted(patches), "lora_keys": sorted(lora), "warnings": warnings.messages}
    open(job["report"], "w").write(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
