#!/usr/bin/env python3
"""Optional check (not part of CI): an SDXL LoRA written by train-network loads into diffusers'
StableDiffusionXLPipeline with `load_lora_weights`, every module is applied, and it changes the
U-Net and both text encoders' weights-as-used (outputs differ from the LoRA-free model).

Usage: check-diffusers-sdxl-lora.py MODEL_DIR LORA.safetensors
  MODEL_DIR: a Diffusers SDXL folder (e.g. tests/fixtures/tiny-sdxl)
Needs torch + diffusers (+ peft), e.g. a venv made for the benchmarks. Exit 0 on success.
"""
import sys

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open


def outputs(pipe):
    torch.manual_seed(0)
    ids = pipe.tokenizer("tok photo, astronaut", padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    ids2 = pipe.tokenizer_2("tok photo, astronaut", padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        o2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
        h2, pooled = o2.hidden_states[-2], o2.text_embeds
        ctx = torch.cat([h1, h2], -1)
        c = pipe.unet.config
        x = torch.randn(1, c.in_channels, 8, 8)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        pred = pipe.unet(x, 500, ctx, added_cond_kwargs={"text_embeds": pooled,
                                                         "time_ids": time_ids}).sample
    return h1, h2, pred


def main():
    model_dir, lora = sys.argv[1], sys.argv[2]
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    base = outputs(pipe)
    with safe_open(lora, "pt") as f:
        names = {k.split(".")[0] for k in f.keys()}
    pipe.load_lora_weights(lora, adapter_name="trained")
    lora_out = outputs(pipe)
    counts = {p: sum(n.startswith(p) for n in names) for p in ("lora_unet_", "lora_te1_", "lora_te2_")}
    print(f"modules in file: {counts}")
    # peft adapters attached per component
    attached = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, comp)
        attached[comp] = sum(1 for n, _ in m.named_modules() if n.endswith("lora_A.trained"))
    print(f"adapted layers: {attached}")
    ok = True
    for what, key, a, b in (("TE1 penultimate", "lora_te1_", base[0], lora_out[0]),
                            ("TE2 penultimate", "lora_te2_", base[1], lora_out[1]),
                            ("U-Net noise_pred", "lora_unet_", base[2], lora_out[2])):
        diff = (a - b).abs().max().item()
        print(f"{what}: max |with LoRA - without| = {diff:.3e}")
        if counts[key] > 0 and diff == 0.0:
            ok = False
    expected = {"unet": counts["lora_unet_"], "text_encoder": counts["lora_te1_"],
                "text_encoder_2": counts["lora_te2_"]}
    if attached != expected:
        print(f"MISMATCH: attached {attached}, file has {expected}")
        ok = False
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
