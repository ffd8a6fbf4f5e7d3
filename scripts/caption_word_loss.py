#!/usr/bin/env python3
"""Does a model use a caption word? The U-Net's loss on training images under their caption,
under the caption with the word swapped for another, and without it, per noise level.

For each kind of image (e.g. the avatars with glasses and those with sunglasses) it takes the
first --count images of DIR/attributes.jsonl, encodes them with the model's VAE, noises them at
fixed timesteps (the same noise for every caption) and prints the mean squared error of the
U-Net's prediction (eps or v, as the scheduler config says) over the latent's eye rows, for the
prompts "anime girl, <hair> hair, <word>", "..., <other word>" and "anime girl, <hair> hair".
A word the model has learned makes its own caption's loss clearly lower than the other two.

    scripts/.venv/bin/python scripts/caption_word_loss.py models/sd-rs-anime runs/avatars2

Runs the model in diffusers (it is a diffusers model directory), on the CPU.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from tokenizers import Tokenizer
from transformers import CLIPTextModel

TIMESTEPS = [50, 200, 400, 600, 800, 900, 980]
# Rows and columns of the 16x16 latent that cover the eyes of a 64x64 avatar (all are drawn at
# the same place): image rows 20-40, columns 16-48.
EYE_ROWS, EYE_COLS = slice(5, 10), slice(4, 12)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("data", type=Path, help="data set folder with attributes.jsonl (scripts/avatars/render.mjs)")
    p.add_argument("--attribute", default="glasses")
    p.add_argument("--words", default="glasses,sunglasses", help="two values of the attribute")
    p.add_argument("--count", type=int, default=48)
    args = p.parse_args()
    torch.manual_seed(0)

    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float32).eval()
    text_encoder = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder", torch_dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer" / "tokenizer.json"))
    scheduler = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")
    length = text_encoder.config.max_position_embeddings
    pad = text_encoder.config.pad_token_id if text_encoder.config.pad_token_id is not None else 0

    def encode(texts):
        ids = [tokenizer.encode(t).ids[:length] for t in texts]
        ids = [i + [pad] * (length - len(i)) for i in ids]
        with torch.no_grad():
            return text_encoder(torch.tensor(ids))[0]

    rows = [json.loads(line) for line in open(args.data / "attributes.jsonl")]
    a, b = args.words.split(",")
    for word, other in [(a, b), (b, a)]:
        chosen = [r for r in rows if r[args.attribute] == word][: args.count]
        images = torch.stack(
            [
                torch.from_numpy(np.asarray(Image.open(args.data / r["file_name"]).convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                for r in chosen
            ]
        )
        with torch.no_grad():
            z0 = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        hair = [r["hair_color"] for r in chosen]
        prompts = {
            "own": encode([f"anime girl, {h} hair, {word}" for h in hair]),
            "other": encode([f"anime girl, {h} hair, {other}" for h in hair]),
            "none": encode([f"anime girl, {h} hair" for h in hair]),
        }
        for t in TIMESTEPS:
            noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(t))
            steps = torch.full((len(chosen),), t)
            noisy = scheduler.add_noise(z0, noise, steps)
            target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z0, noise, steps)
            loss = {}
            with torch.no_grad():
                for name, context in prompts.items():
                    pred = unet(noisy, steps, encoder_hidden_states=context).sample
                    loss[name] = ((pred - target) ** 2)[:, :, EYE_ROWS, EYE_COLS].mean().item()
            print(
                f"{word:>10} images, t={t:3d}: loss under '{word}' {loss['own']:.4f}, "
                f"'{other}' {loss['other']:.4f}, no eyewear word {loss['none']:.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
