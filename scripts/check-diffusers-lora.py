#!/usr/bin/env python3
"""Interoperability check (not run by the tests: it needs a full torch + diffusers + peft):
a LoRA file written by this project loads in diffusers' `load_lora_weights` and gives the
reference's U-Net output.

Usage: PYTHON-WITH-DIFFUSERS scripts/check-diffusers-lora.py LORA.safetensors [MULTIPLIER]

LORA must hold the modules of tests/fixtures/lora/lora-sd15.safetensors (e.g. written by
`merge-lora --save_to X --models tests/fixtures/lora/lora-sd15.safetensors --ratios 1 --concat`,
or re-saved by any of our tools): the U-Net output at multiplier 0.7 is compared with
goldens/lora-sd15-applied.safetensors (sd-scripts' own result). Exit 0 when within 1e-4.
"""
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

root = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
lora = sys.argv[1]
mul = float(sys.argv[2]) if len(sys.argv) > 2 else 0.7
pipe = StableDiffusionPipeline.from_pretrained(root / "tiny-sd15", torch_dtype=torch.float32, safety_checker=None)
pipe.load_lora_weights(lora, adapter_name="ours")
pipe.set_adapters(["ours"], [mul])
g = load_file(root / "goldens" / "lora-sd15-applied.safetensors")
base = load_file(root / "goldens" / "unet-sd15.safetensors")
with torch.no_grad():
    out = pipe.unet(g["unet_sample"], g["unet_timestep"], base["encoder_hidden_states"]).sample
diff = (out - g["unet_noise_pred"]).abs().max().item()
print(f"diffusers load_lora_weights({lora}) at {mul}: max |U-Net output - sd-scripts golden| = {diff:.3e}")
sys.exit(0 if diff <= 1e-4 else 1)
