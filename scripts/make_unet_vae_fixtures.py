#!/usr/bin/env python3
"""Parity fixtures for sd-rs' U-Net and AutoencoderKL, made with diffusers.

Run from the repository root:

    scripts/.venv/bin/python scripts/make_unet_vae_fixtures.py
        writes tests/fixtures/unet/{sd15,sd2,sdxl}/ and tests/fixtures/vae/

    scripts/.venv/bin/python scripts/make_unet_vae_fixtures.py --check-saved target/tmp/sd-rs-saved
        loads the models that sd-rs saved there (written by `cargo test --release --test
        unet_parity` and `--test vae_parity`) in diffusers, runs them on the inputs stored next
        to them and compares with sd-rs' outputs; exits non-zero on a mismatch.

Each fixture is a tiny random-weight model in diffusers' layout (config.json + safetensors,
written by save_pretrained) plus io.safetensors with its inputs and diffusers' outputs. Every
parameter is re-initialised (diffusers zero-initialises some output layers, which would make
parity vacuous). The reference outputs are computed in float64 and stored as float32, so they
are the exact function values up to float32 rounding. Everything is seeded: running the script
again reproduces the same files.

The three U-Nets cover SD1.x (1x1-conv projections, one head count for all blocks), SD2.x
(linear projections, per-block heads, upcast_attention, an odd latent size that needs
diffusers' upsample_size path, weights stored as an fp16 variant) and SDXL (first block
without attention, 2 transformer layers in the last block, text_time added conditioning,
sharded bf16 weights).
"""

import argparse
import math
import os
import sys

import torch
from safetensors.torch import load_file, save_file

from diffusers import AutoencoderKL, UNet2DConditionModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

UNET_COMMON = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16, 16),
    norm_num_groups=4,
    cross_attention_dim=16,
)

UNETS = {
    "sd15": dict(
        UNET_COMMON,
        sample_size=8,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        # The diffusers quirk: for these models attention_head_dim is the number of heads.
        attention_head_dim=2,
    ),
    "sd2": dict(
        UNET_COMMON,
        sample_size=8,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 2, 2),
        use_linear_projection=True,
        upcast_attention=True,
        flip_sin_to_cos=False,
        freq_shift=1,
    ),
    "sdxl": dict(
        UNET_COMMON,
        sample_size=8,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2, 4),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=12 + 6 * 8,
    ),
}

# Latent (height, width), timesteps per sample, context length, how the weights are saved.
UNET_CASES = {
    "sd15": dict(size=(8, 8), timesteps=[999.0, 17.0], ctx_len=5, save={}),
    # 12x10: the width goes 10 -> 5 -> 3 and back 3 -> 5 -> 10 (diffusers' upsample_size path).
    "sd2": dict(size=(12, 10), timesteps=[250.0, 731.5], ctx_len=4,
                save=dict(variant="fp16"), dtype=torch.float16),
    "sdxl": dict(size=(8, 6), timesteps=[3.0, 999.0], ctx_len=3, text_embeds=12,
                 save=dict(max_shard_size="200KB"), dtype=torch.bfloat16),
}

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
    scaling_factor=0.13025,
)


# The published architectures (only the keys that differ from diffusers' defaults). Their
# tensor names and shapes are recorded (no weights) so the Rust tests can check that sd-rs
# builds exactly diffusers' full-size models.
REAL_UNETS = {
    "sd15": dict(sample_size=64, cross_attention_dim=768),
    "sd21": dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
REAL_VAES = {
    "sd": dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        sample_size=512,
    ),
}


def fnv1a64(text: str) -> str:
    """FNV-1a (64 bit) of the UTF-8 text, as hex; the Rust test computes the same."""
    h = 0xCBF29CE484222325
    for b in text.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def architecture_signature(model: torch.nn.Module) -> dict:
    """Tensor count, parameter count and a hash of the sorted `name:d0,d1;` list."""
    shapes = sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())
    text = "".join(f"{k}:{','.join(map(str, s))};" for k, s in shapes)
    return dict(n_tensors=len(shapes), n_params=sum(math.prod(s) for _, s in shapes), fnv1a64=fnv1a64(text))


def make_real_architectures() -> None:
    import json

    for cls, table, sub in [(UNet2DConditionModel, REAL_UNETS, "unet"), (AutoencoderKL, REAL_VAES, "vae")]:
        out = {}
        for name, cfg in table.items():
            with torch.device("meta"):
                model = cls(**cfg)
            # The config exactly as diffusers writes it, so sd-rs parses what it will meet.
            config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
            out[name] = dict(config=config, **architecture_signature(model))
            print(f"{sub}/{name}: {out[name]['n_tensors']} tensors, {out[name]['n_params']} params")
        path = os.path.join(FIXTURES, sub, "real_architectures.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)
            f.write("\n")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-initialises every parameter: weights ~ N(0, 1/fan_in) (activations stay O(1)),
    biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("bias"):
                value = 0.1 * noise
            elif p.ndim == 1:
                value = 1.0 + 0.1 * noise
            else:
                fan_in = p[0].numel()
                value = noise / math.sqrt(fan_in)
            p.copy_(value.to(p.dtype))


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def unet_inputs(name: str, cfg: dict, seed: int) -> dict:
    case = UNET_CASES[name]
    gen = torch.Generator().manual_seed(seed)
    h, w = case["size"]
    inputs = {
        "sample": randn(gen, 2, cfg["in_channels"], h, w),
        "timesteps": torch.tensor(case["timesteps"], dtype=torch.float32),
        "encoder_hidden_states": randn(gen, 2, case["ctx_len"], cfg["cross_attention_dim"]),
    }
    if "text_embeds" in case:
        inputs["text_embeds"] = randn(gen, 2, case["text_embeds"])
        inputs["time_ids"] = torch.tensor(
            [[64.0, 48.0, 0.0, 0.0, 64.0, 48.0], [128.0, 96.0, 8.0, 4.0, 64.0, 48.0]]
        )
    return inputs


def run_unet(model: UNet2DConditionModel, inputs: dict, dtype=torch.float64) -> torch.Tensor:
    model = model.to(dtype)
    added = None
    if "text_embeds" in inputs:
        added = {"text_embeds": inputs["text_embeds"].to(dtype), "time_ids": inputs["time_ids"].to(dtype)}
    with torch.no_grad():
        out = model(
            inputs["sample"].to(dtype),
            inputs["timesteps"],
            encoder_hidden_states=inputs["encoder_hidden_states"].to(dtype),
            added_cond_kwargs=added,
        ).sample
    return out.float()


def make_unets() -> None:
    for i, (name, cfg) in enumerate(UNETS.items()):
        case = UNET_CASES[name]
        torch.manual_seed(100 + i)
        model = UNet2DConditionModel(**cfg)
        randomize(model, seed=200 + i)
        dtype = case.get("dtype", torch.float32)
        model = model.to(dtype)
        out_dir = os.path.join(FIXTURES, "unet", name)
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True, **case["save"])
        # The reference runs on exactly the stored (possibly fp16-rounded) weights.
        inputs = unet_inputs(name, cfg, seed=300 + i)
        out = run_unet(model, inputs)
        save_file({**inputs, "out": out}, os.path.join(out_dir, "io.safetensors"))
        n = sum(p.numel() for p in model.parameters())
        print(f"unet/{name}: {n} params, out {tuple(out.shape)} std {out.std():.3f} "
              f"max|.| {out.abs().max():.3f}")


def make_vae() -> None:
    torch.manual_seed(10)
    model = AutoencoderKL(**VAE_CONFIG)
    randomize(model, seed=11)
    out_dir = os.path.join(FIXTURES, "vae")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    gen = torch.Generator().manual_seed(12)
    image = randn(gen, 2, 3, 16, 16).clamp(-1, 1)
    noise = randn(gen, 2, 4, 8, 8)
    latents = randn(gen, 2, 4, 8, 8)
    # Tiled cases: tiles of 16 px / 8 latents overlapping by a quarter, on a 24 px image and
    # a 12-latent map (2 x 2 tiles with partial tiles at the edges).
    tiled_image = randn(gen, 1, 3, 24, 24).clamp(-1, 1)
    tiled_latents = randn(gen, 1, 4, 12, 12)
    m = model.to(torch.float64)
    with torch.no_grad():
        post = m.encode(image.double()).latent_dist
        decoded = m.decode(latents.double()).sample
        m.enable_tiling()
        tiled_post = m.encode(tiled_image.double()).latent_dist
        tiled_decoded = m.decode(tiled_latents.double()).sample
        m.disable_tiling()
        untiled_decoded = m.decode(tiled_latents.double()).sample
    tensors = {
        "image": image,
        "noise": noise,
        "latents": latents,
        "mean": post.mean.float().contiguous(),
        "logvar": post.logvar.float().contiguous(),
        "kl": post.kl().float(),
        "sample": (post.mean + post.std * noise.double()).float().contiguous(),
        "decoded": decoded.float(),
        "tiled_image": tiled_image,
        "tiled_mean": tiled_post.mean.float().contiguous(),
        "tiled_logvar": tiled_post.logvar.float().contiguous(),
        "tiled_latents": tiled_latents,
        "tiled_decoded": tiled_decoded.float(),
    }
    save_file(tensors, os.path.join(out_dir, "io.safetensors"))
    n = sum(p.numel() for p in model.parameters())
    seam = (tiled_decoded - untiled_decoded).abs().max().item()
    print(f"vae: {n} params, decoded std {decoded.std():.3f}, mean std {post.mean.std():.3f}, "
          f"tiled vs untiled decode max diff {seam:.3f} (tiling is not exact, as in diffusers)")


def same_keys(component_dir: str, model: torch.nn.Module) -> bool:
    """The saved file holds exactly the model's tensors (diffusers only warns otherwise)."""
    saved = set(load_file(os.path.join(component_dir, "diffusion_pytorch_model.safetensors")))
    expected = set(model.state_dict())
    if saved != expected:
        print(f"{component_dir}: missing {sorted(expected - saved)}, unexpected {sorted(saved - expected)}")
    else:
        print(f"{component_dir}: the {len(saved)} saved tensors are exactly diffusers' state_dict keys")
    return saved == expected


def check_saved(saved: str) -> int:
    """Loads what sd-rs saved in `saved/{unet,vae}` with diffusers and compares outputs."""
    failures = 0
    tol = 1e-4
    unet_dir = os.path.join(saved, "unet")
    if os.path.isdir(unet_dir):
        model = UNet2DConditionModel.from_pretrained(unet_dir)
        failures += not same_keys(unet_dir, model)
        io = load_file(os.path.join(saved, "unet_io.safetensors"))
        out = run_unet(model, io, dtype=torch.float32)
        diff = (out - io["out"]).abs().max().item()
        n = sum(p.numel() for p in model.parameters())
        ok = diff < tol
        failures += not ok
        print(f"{unet_dir}: diffusers loaded {n} params; max abs diff vs sd-rs {diff:.3e} "
              f"({'ok' if ok else 'MISMATCH'})")
    vae_dir = os.path.join(saved, "vae")
    if os.path.isdir(vae_dir):
        model = AutoencoderKL.from_pretrained(vae_dir).float()
        failures += not same_keys(vae_dir, model)
        io = load_file(os.path.join(saved, "vae_io.safetensors"))
        with torch.no_grad():
            post = model.encode(io["image"]).latent_dist
            dec = model.decode(io["latents"]).sample
        n = sum(p.numel() for p in model.parameters())
        for key, ours, theirs in [("mean", io["mean"], post.mean), ("logvar", io["logvar"], post.logvar),
                                  ("decoded", io["decoded"], dec)]:
            diff = (ours - theirs).abs().max().item()
            ok = diff < tol
            failures += not ok
            print(f"{vae_dir}: diffusers loaded {n} params; {key} max abs diff vs sd-rs {diff:.3e} "
                  f"({'ok' if ok else 'MISMATCH'})")
    if not os.path.isdir(unet_dir) and not os.path.isdir(vae_dir):
        print(f"nothing to check in {saved} (expected unet/ and/or vae/)")
        return 1
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-saved", metavar="DIR", help="check models saved by sd-rs in DIR")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    if args.check_saved:
        return check_saved(args.check_saved)
    make_unets()
    make_vae()
    make_real_architectures()
    return 0


if __name__ == "__main__":
    sys.exit(main())
