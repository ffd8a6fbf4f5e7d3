#!/usr/bin/env python
"""Scheduler parity fixtures: diffusers' noise schedules and samplers, recorded for the Rust tests.

Run from the repository root (CPU only, a few seconds, deterministic):

    scripts/.venv/bin/python scripts/make_scheduler_fixtures.py

Writes tests/fixtures/schedulers/:
  schedulers.json          versions, the scheduler configs, timestep/sigma tables for every
                           sampler x config x spacing x step count, and one entry per recorded run
  schedulers.safetensors   float32 tensors: betas and alphas_cumprod of each config, the toy
                           denoiser's weights, the initial latents, the per-step noise, and for each
                           run the model output, x0 prediction and latents after every step (the model input is
                           not stored: Rust recomputes it and must reproduce model_out)

The toy denoiser is model(x_in, t) = W x_in (a fixed 4x4 mix over channels) + bias * t / 1000.
Every random number a scheduler asks for is taken, in order, from the recorded `noise` stack
(randn_tensor is replaced in the scheduler modules), so Rust can replay exactly the same noise and
must consume exactly as many draws as diffusers did.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers import (
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "schedulers"
SHAPE = (2, 4, 4, 4)
STEPS = 10
NUM_NOISE = 12
TABLE_STEPS = [1, 3, 7, 10, 25, 50]

# Stable Diffusion 1.5's scheduler_config.json (PNDM), with the spacing written out; the extra
# PNDM keys must be ignored by the Rust reader.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
CONFIGS = {
    "sd15": SD15,
    # The same without timestep_spacing: each scheduler class applies its own default.
    "sd15_raw": {k: v for k, v in SD15.items() if k != "timestep_spacing"},
    # SD 2.1-v style with the zero-terminal-SNR fix.
    "sd21v": {
        "_class_name": "DDIMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "trailing",
    },
    # Cosine schedule; clip_sample left to the DDPM/DDIM default (true).
    "cosine": {
        "_class_name": "DDPMScheduler",
        "beta_schedule": "squaredcos_cap_v2",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
    },
    # The DDPM paper's linear schedule with an x0-predicting model and a wider clip range.
    "linear_sample": {
        "beta_schedule": "linear",
        "prediction_type": "sample",
        "timestep_spacing": "leading",
        "clip_sample_range": 1.5,
    },
    # Every default.
    "default": {},
    # Only for the betas table (DDPMScheduler is the only class with the sigmoid schedule).
    "sigmoid": {"beta_schedule": "sigmoid", "beta_start": 0.0001, "beta_end": 0.02},
}
TRAJECTORY_CONFIGS = ["sd15", "sd21v", "cosine", "linear_sample"]

# name -> (class, extra config, step kwargs)
SAMPLERS = {
    "ddpm": (DDPMScheduler, {}, {}),
    "ddpm_fixed_large": (DDPMScheduler, {"variance_type": "fixed_large"}, {}),
    "ddim": (DDIMScheduler, {}, {"eta": 0.0}),
    "ddim_eta": (DDIMScheduler, {}, {"eta": 0.5}),
    "euler": (EulerDiscreteScheduler, {}, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, {}),
    "dpmpp_2m": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        {},
    ),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        {},
    ),
}
TABLE_SAMPLERS = ["ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"]


def f32_list(values):
    """Shortest decimal that reads back to the same float32, so the JSON stays small and exact."""
    return [float(str(np.float32(v))) for v in np.asarray(values, dtype=np.float32).ravel()]


def dumps_one_entry_per_line(meta):
    """JSON with one line per top-level key and per table/run entry: small yet diffable."""
    lines = []
    for key, value in meta.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            items = ",\n  ".join(json.dumps(v, separators=(",", ":")) for v in value)
            lines.append(f"{json.dumps(key)}: [\n  {items}\n ]")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def make(name, config, **override):
    cls, extra, _ = SAMPLERS[name]
    return cls.from_config({**config, **extra, **override})


class NoiseQueue:
    """Stands in for randn_tensor in the scheduler modules, handing out the recorded noise."""

    def __init__(self, noise):
        self.noise = noise
        self.drawn = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        if self.drawn >= len(self.noise):
            raise RuntimeError("scheduler asked for more noise than recorded")
        z = self.noise[self.drawn]
        assert tuple(shape) == tuple(z.shape), (shape, z.shape)
        self.drawn += 1
        return z.to(device=device or z.device, dtype=dtype or z.dtype)


def install_noise(queue):
    for module in (
        scheduling_ddim,
        scheduling_ddpm,
        scheduling_dpmsolver_multistep,
        scheduling_euler_ancestral_discrete,
        scheduling_euler_discrete,
    ):
        module.randn_tensor = queue


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(20240601)
    tensors = {}

    # The toy denoiser and the random inputs.
    weight = torch.eye(4) * 0.6 + 0.15 * torch.randn(4, 4, generator=gen)
    bias = 0.5 * torch.randn(4, generator=gen)
    x_init = torch.randn(SHAPE, generator=gen)
    x_orig = 0.8 * torch.randn(SHAPE, generator=gen)
    noise = torch.randn((NUM_NOISE,) + SHAPE, generator=gen)
    tensors.update(
        {
            "toy/weight": weight,
            "toy/bias": bias,
            "x_init": x_init,
            "x_orig": x_orig,
            "noise": noise,
        }
    )

    def model(x_in, t):
        return torch.einsum("oc,bchw->bohw", weight, x_in) + (bias * (t / 1000.0)).view(1, 4, 1, 1)

    # Training tables and per-sample q_sample / velocity.
    q_timesteps = [10, 500, 999]
    q_x0 = x_orig[:1].repeat(3, 1, 1, 1)
    q_noise = noise[0][:1].repeat(3, 1, 1, 1)
    for cname, cfg in CONFIGS.items():
        ddpm = DDPMScheduler.from_config(cfg)
        tensors[f"schedule/{cname}/betas"] = ddpm.betas.float()
        tensors[f"schedule/{cname}/alphas_cumprod"] = ddpm.alphas_cumprod.float()
        t = torch.tensor(q_timesteps)
        tensors[f"q_sample/{cname}"] = ddpm.add_noise(q_x0, q_noise, t)
        tensors[f"velocity/{cname}"] = ddpm.get_velocity(q_x0, q_noise, t)
    tensors["q_sample/x0"] = q_x0
    tensors["q_sample/noise"] = q_noise

    # Timestep and sigma tables.
    tables = []
    for cname, cfg in CONFIGS.items():
        if cname == "sigmoid":
            continue
        for spacing in [None, "linspace", "leading", "trailing"]:
            override = {} if spacing is None else {"timestep_spacing": spacing}
            for n in TABLE_STEPS:
                for sname in TABLE_SAMPLERS:
                    sched = make(sname, cfg, **override)
                    sched.set_timesteps(n)
                    sigmas = getattr(sched, "sigmas", None)
                    has_sigmas = sname.startswith(("euler", "dpmpp"))
                    tables.append(
                        {
                            "config": cname,
                            "spacing": spacing,
                            "steps": n,
                            "sampler": sname,
                            "timesteps": f32_list(sched.timesteps.numpy()),
                            "sigmas": f32_list(sigmas.numpy()) if has_sigmas else None,
                            "init_noise_sigma": float(np.float32(float(sched.init_noise_sigma))),
                        }
                    )

    # Sampling runs on the toy denoiser.
    runs = []
    strength = 0.6
    for cname in TRAJECTORY_CONFIGS:
        cfg = CONFIGS[cname]
        for sname, (_, _, step_kwargs) in SAMPLERS.items():
            if sname == "euler_a" and cfg.get("prediction_type") == "sample":
                continue  # diffusers raises NotImplementedError for this combination
            sched = make(sname, cfg)
            sched.set_timesteps(STEPS)
            # Step i is step i: without a begin index diffusers finds the step by looking the
            # timestep up, and with repeated timesteps (Karras sigmas on a zero-SNR schedule give
            # 999 twice) it would start at the second one and run off the end.
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(0)
            queue = NoiseQueue(noise)
            install_noise(queue)
            latents = x_init * sched.init_noise_sigma
            model_out, x0s, after = [], [], []
            for t in sched.timesteps:
                x_in = sched.scale_model_input(latents, t)
                out = model(x_in, float(t))
                res = sched.step(out, t, latents, **step_kwargs)
                if getattr(res, "pred_original_sample", None) is not None:
                    x0 = res.pred_original_sample
                else:  # DPM-Solver keeps its x0 prediction as the last model output
                    x0 = sched.model_outputs[-1]
                model_out.append(out)
                x0s.append(x0)
                after.append(res.prev_sample)
                latents = res.prev_sample
            key = f"run/{cname}/{sname}"
            tensors[f"{key}/model_out"] = torch.stack(model_out)
            tensors[f"{key}/x0"] = torch.stack(x0s)
            tensors[f"{key}/latents"] = torch.stack(after)

            # img2img start: the pipeline's get_timesteps + add_noise.
            img = make(sname, cfg)
            img.set_timesteps(STEPS)
            init_timestep = min(int(STEPS * strength), STEPS)
            t_start = max(STEPS - init_timestep, 0)
            if hasattr(img, "set_begin_index"):
                img.set_begin_index(t_start)
            start_t = img.timesteps[t_start : t_start + 1].repeat(SHAPE[0])
            tensors[f"{key}/img2img"] = img.add_noise(x_orig, noise[0], start_t)

            runs.append(
                {
                    "config": cname,
                    "sampler": sname,
                    "key": key,
                    "steps": STEPS,
                    "step_kwargs": step_kwargs,
                    "timesteps": f32_list(sched.timesteps.numpy()),
                    "init_noise_sigma": float(np.float32(float(sched.init_noise_sigma))),
                    "noise_draws": queue.drawn,
                    "img2img_strength": strength,
                    "img2img_start_index": t_start,
                }
            )

    meta = {
        "generator": "scripts/make_scheduler_fixtures.py",
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "toy_model": "model(x_in, t) = einsum('oc,bchw->bohw', toy/weight, x_in) + toy/bias * t / 1000",
        "shape": list(SHAPE),
        "configs": CONFIGS,
        "q_sample_timesteps": q_timesteps,
        # Configs as diffusers' save_config writes them (DPMSolverMultistep's contains the
        # non-JSON token -Infinity), stored as strings.
        "saved_configs": {
            cls.__name__: cls().to_json_string()
            for cls in (
                DDPMScheduler,
                DDIMScheduler,
                EulerDiscreteScheduler,
                EulerAncestralDiscreteScheduler,
                DPMSolverMultistepScheduler,
            )
        },
        "tables": tables,
        "runs": runs,
    }
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(OUT / "schedulers.safetensors"))
    os.chmod(OUT / "schedulers.safetensors", 0o644)
    with open(OUT / "schedulers.json", "w") as f:
        f.write(dumps_one_entry_per_line(meta))
    print(f"wrote {len(tensors)} tensors, {len(tables)} tables, {len(runs)} runs to {OUT}")


if __name__ == "__main__":
    main()
