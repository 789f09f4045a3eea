#!/usr/bin/env python3
"""Write per-call golden data for gen-img's samplers from diffusers' schedulers.

Usage: /tmp/bench-venv/bin/python scripts/make-sampler-goldens.py [OUT]
       (python with torch and diffusers==0.32.1; OUT defaults to
       tools/gen-img/tests/data/sampler-goldens.safetensors)

No U-Net is involved: the "model" is the fixed affine function

    out(x_in, t) = 0.1 * x_in + (t / 1000) * C + D

of the scaled model input and the (possibly fractional) timestep, where C and D are fixed
N(0, 1) tensors. Each case builds the diffusers scheduler the way gen_img.py does
(generation.md §3.1: scaled_linear betas 0.00085..0.012, 1000 train steps, steps_offset 1 where
the class has it (train-network samples: 0), clip_sample false for DDIM, prediction type), then
runs the loop of StableDiffusionPipeline: x = randn * init_noise_sigma; per entry t of
scheduler.timesteps: x_in = scale_model_input(x, t); x = step(out(x_in, t), t, x).

Ancestral samplers draw their noise through diffusers' `randn_tensor`; it is replaced by draws
from a seeded generator that are recorded, so the Rust test can hand the same noise in.

Tensors written per case `<case>`:
  <case>.timesteps  [calls]  f32  the U-Net timestep of each call
  <case>.sigmas     [n]      f32  scheduler.sigmas when the scheduler has them
  <case>.x_in       [calls, 1, 4, 2, 2]  model input of each call
  <case>.out        [calls, 1, 4, 2, 2]  model output of each call
  <case>.x          [calls + 1, 1, 4, 2, 2]  latents before the first call, then after each
  <case>.noise      [draws, 1, 4, 2, 2]  ancestral noise in the order it was drawn
Shared: C, D [1, 4, 2, 2]. The header metadata "cases" lists
case -> {sampler, prediction, steps, variant} as JSON.
"""

import json
import os
import sys

import diffusers
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers import (
    scheduling_euler_ancestral_discrete,
    scheduling_k_dpm_2_ancestral_discrete,
)
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    ROOT, "tools", "gen-img", "tests", "data", "sampler-goldens.safetensors"
)
SHAPE = (1, 4, 2, 2)

CLASSES = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "lms": LMSDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpm_2": KDPM2DiscreteScheduler,
    "dpm_2_a": KDPM2AncestralDiscreteScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "dpmsingle": DPMSolverSinglestepScheduler,
}

# (case name, sampler, prediction, steps, variant); variant "gen_img" or "training".
CASES = [
    ("ddim_eps_5", "ddim", "epsilon", 5, "gen_img"),
    ("pndm_eps_5", "pndm", "epsilon", 5, "gen_img"),
    ("pndm_eps_20", "pndm", "epsilon", 20, "gen_img"),
    ("pndm_v_6", "pndm", "v_prediction", 6, "gen_img"),
    ("pndm_eps_5_training", "pndm", "epsilon", 5, "training"),
    ("lms_eps_6", "lms", "epsilon", 6, "gen_img"),
    ("euler_eps_5", "euler", "epsilon", 5, "gen_img"),
    ("euler_a_eps_5", "euler_a", "epsilon", 5, "gen_img"),
    ("heun_eps_5", "heun", "epsilon", 5, "gen_img"),
    ("dpm_2_eps_5", "dpm_2", "epsilon", 5, "gen_img"),
    ("dpm_2_a_eps_5", "dpm_2_a", "epsilon", 5, "gen_img"),
    ("dpmsolver_eps_6", "dpmsolver", "epsilon", 6, "gen_img"),
    ("dpmsolver++_eps_6", "dpmsolver++", "epsilon", 6, "gen_img"),
    ("dpmsolver++_v_20", "dpmsolver++", "v_prediction", 20, "gen_img"),
    ("dpmsingle_eps_5", "dpmsingle", "epsilon", 5, "gen_img"),
    ("dpmsingle_eps_6", "dpmsingle", "epsilon", 6, "gen_img"),
    ("dpmsingle_v_7", "dpmsingle", "v_prediction", 7, "gen_img"),
    ("dpmsingle_eps_20", "dpmsingle", "epsilon", 20, "gen_img"),
]


def make_scheduler(sampler, prediction, variant):
    cls = CLASSES[sampler]
    kwargs = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction,
    )
    if sampler in ("dpmsolver", "dpmsolver++"):
        kwargs["algorithm_type"] = sampler
    if sampler == "dpmsolver":
        # diffusers refuses final_sigmas_type "zero" with noise prediction; gen-img ends at
        # σ_min as this setting does.
        kwargs["final_sigmas_type"] = "sigma_min"
    scheduler = cls(**kwargs)
    # gen_img.py: steps_offset 1 and clip_sample false where the config has them.
    if variant == "gen_img":
        if "steps_offset" in scheduler.config:
            scheduler.register_to_config(steps_offset=1)
        if "clip_sample" in scheduler.config:
            scheduler.register_to_config(clip_sample=False)
    return scheduler


class NoiseRecorder:
    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        z = torch.randn(shape, generator=self.generator, dtype=torch.float32)
        self.drawn.append(z.clone())
        return z.to(dtype=dtype or torch.float32)


def run_case(sampler, prediction, steps, variant, c, d, seed):
    scheduler = make_scheduler(sampler, prediction, variant)
    scheduler.set_timesteps(steps)
    recorder = NoiseRecorder(seed + 1000)
    scheduling_euler_ancestral_discrete.randn_tensor = recorder
    scheduling_k_dpm_2_ancestral_discrete.randn_tensor = recorder
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * scheduler.init_noise_sigma
    xs, x_ins, outs, ts = [x.clone()], [], [], []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        tf = t.to(torch.float32)
        out = 0.1 * x_in + (tf / 1000.0) * c + d
        x = scheduler.step(out, t, x).prev_sample
        ts.append(float(tf))
        x_ins.append(x_in.clone())
        outs.append(out.clone())
        xs.append(x.clone())
    data = {
        "timesteps": torch.tensor(ts, dtype=torch.float32),
        "x_in": torch.stack(x_ins),
        "out": torch.stack(outs),
        "x": torch.stack(xs),
    }
    if hasattr(scheduler, "sigmas") and scheduler.sigmas is not None:
        data["sigmas"] = scheduler.sigmas.to(torch.float32).clone()
    if recorder.drawn:
        data["noise"] = torch.stack(recorder.drawn)
    return data


def main():
    assert diffusers.__version__ == "0.32.1", diffusers.__version__
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    c = torch.randn(SHAPE, generator=g)
    d = torch.randn(SHAPE, generator=g)
    tensors = {"C": c, "D": d}
    meta = {}
    for i, (name, sampler, prediction, steps, variant) in enumerate(CASES):
        data = run_case(sampler, prediction, steps, variant, c, d, seed=i)
        for k, v in data.items():
            tensors[f"{name}.{k}"] = v.contiguous()
        meta[name] = {"sampler": sampler, "prediction": prediction, "steps": steps, "variant": variant}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(
        tensors,
        OUT,
        metadata={
            "cases": json.dumps(meta, sort_keys=True),
            "made_by": "scripts/make-sampler-goldens.py",
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
        },
    )
    print(f"wrote {OUT}: {len(CASES)} cases, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
