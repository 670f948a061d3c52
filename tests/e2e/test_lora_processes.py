"""LoRA adapters are identical in separate processes for one seed: what lets ranks start without communicating."""

from __future__ import annotations

import subprocess
import sys

_CHECKSUM_SCRIPT = """
import sys
from cogvx_dist.core.lora import LoraSettings, adapter_checksum, inject_lora, lora_state_dict
from cogvx_dist.core.loading import load_transformer
transformer = inject_lora(load_transformer(sys.argv[1]), LoraSettings(), seed=int(sys.argv[2]))
print(adapter_checksum(lora_state_dict(transformer)))
"""


def test_same_seed_gives_identical_adapters_in_separate_processes(tiny_checkpoint):
    source = str(tiny_checkpoint("CogVideoX-2b"))

    def checksum(seed: int) -> str:
        out = subprocess.run([sys.executable, "-c", _CHECKSUM_SCRIPT, source, str(seed)], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    first, second, other = checksum(7), checksum(7), checksum(8)
    assert len(first) == 64 and first == second
    assert other != first
