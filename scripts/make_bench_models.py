#!/usr/bin/env python3
"""Build the random-weight models that scripts/bench.py times in sd-rs and in diffusers.

Run from the repository root (needs no network; a few minutes, ~4.3 GB of disk):

    scripts/.venv/bin/python scripts/make_bench_models.py            # skips models already built
    scripts/.venv/bin/python scripts/make_bench_models.py --force    # rebuild them

It writes, once, under data/bench/ (git-ignored):

    sd15/   an SD 1.5-shaped StableDiffusionPipeline directory in diffusers' layout, fp32
            safetensors: UNet2DConditionModel (860M parameters), AutoencoderKL (84M) and
            CLIPTextModel (123M) with the configs of stable-diffusion-v1-5 (written below, so no
            download), an EulerDiscreteScheduler with SD 1.5's betas, and a CLIP tokenizer.
    small/  the shipped default model's U-Net and text encoder (configs/sd-rs-anime/unet.toml,
            [model.unet] and [model.text_encoder]) for training throughput.

Timing does not depend on the weights' values, only their shapes, so random weights (seeded,
diffusers' and transformers' own initialisation) measure the same work as the real model. Both
tools load these very files, so they run identical weights.

The tokenizer is the test fixture tests/fixtures/text/clip_l/tokenizer: a CLIP BPE vocabulary of
241 entries (every printable ASCII character, alone and word-final, plus a few words), not SD's
49,408. Every ASCII prompt tokenizes with it (unknown words fall back to characters), and both
tools pad to the text encoder's 77 positions, so text encoding runs the same (2, 77) ids through
the same network as with the real vocabulary; only the id values differ.
"""

import argparse
import json
import os
import shutil
import sys
import tomllib

import torch
from safetensors.torch import load_file, save_file
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "data", "bench")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "text", "clip_l", "tokenizer")
DEFAULT_MODEL_CONFIG = os.path.join(ROOT, "configs", "sd-rs-anime", "unet.toml")

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)

# vae/config.json.
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

# text_encoder/config.json (openai/clip-vit-large-patch14's text tower, with the legacy
# eos_token_id = 2 that SD 1.5 ships).
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

# scheduler/scheduler_config.json's betas, as an Euler scheduler (SD 1.5 ships PNDM, which sd-rs
# does not have): both tools then take the same 20 Euler steps.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
)

# The word-level tokenizer that `sd-rs train` builds from the avatar captions: 54 words plus
# <pad>, <unk>, <|startoftext|>, <|endoftext|> (ids 0..3), 32 positions.
SMALL_VOCAB = 58
SMALL_MAX_LENGTH = 32


def save_text_encoder(model, dest):
    """Saves a CLIPTextModel with the `text_model.` key prefix, as the SD 1.5 repository ships it
    (transformers 5 would drop the prefix; sd-rs's trainer loads weights by the prefixed names),
    and checks that transformers loads the file back to the same weights."""
    model.save_pretrained(dest, safe_serialization=True)
    path = os.path.join(dest, "model.safetensors")
    tensors = load_file(path)
    save_file({k if k.startswith("text_model.") else "text_model." + k: v.contiguous()
               for k, v in tensors.items()}, path, metadata={"format": "pt"})
    back = CLIPTextModel.from_pretrained(dest).state_dict()
    for name, value in model.state_dict().items():
        if not torch.equal(back[name], value):
            raise SystemExit(f"{path}: {name} does not load back the same")


def build_sd15(dest):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(dest, safe_serialization=True)
    save_text_encoder(text_encoder, os.path.join(dest, "text_encoder"))
    # The tokenizer as the original SD repositories ship it (vocab.json + merges.txt), which is
    # also what save_pretrained may have rewritten in a newer format.
    shutil.rmtree(os.path.join(dest, "tokenizer"))
    shutil.copytree(TOKENIZER, os.path.join(dest, "tokenizer"))
    counts = {
        "unet": sum(p.numel() for p in unet.parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
        "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
    }
    return counts


def build_small(dest):
    with open(DEFAULT_MODEL_CONFIG, "rb") as f:
        model = tomllib.load(f)["model"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**model["unet"])
    text = dict(model["text_encoder"])
    text.update(
        vocab_size=SMALL_VOCAB,
        max_position_embeddings=SMALL_MAX_LENGTH,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    unet.save_pretrained(os.path.join(dest, "unet"), safe_serialization=True)
    save_text_encoder(text_encoder, os.path.join(dest, "text_encoder"))
    counts = {
        "unet": sum(p.numel() for p in unet.parameters()),
        "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
    }
    return counts


def build(name, builder, force):
    dest = os.path.join(OUT, name)
    done = os.path.join(dest, "BUILT.json")
    if os.path.exists(done) and not force:
        print(f"{dest}: already built (--force rebuilds)")
        return
    if os.path.exists(dest):
        shutil.rmtree(dest)
    tmp = dest + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    counts = builder(tmp)
    with open(os.path.join(tmp, "BUILT.json"), "w") as f:
        json.dump({"parameters": counts, "torch": torch.__version__}, f, indent=2)
    os.rename(tmp, dest)
    print(f"{dest}: " + ", ".join(f"{k} {v / 1e6:.1f}M parameters" for k, v in counts.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild models already built")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    build("small", build_small, args.force)
    build("sd15", build_sd15, args.force)


if __name__ == "__main__":
    sys.exit(main())
