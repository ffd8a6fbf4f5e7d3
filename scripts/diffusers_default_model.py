#!/usr/bin/env python3
"""Load the shipped default model (models/sd-rs-anime) in diffusers and generate with it.

Shows that what sd-rs trains is a plain diffusers model: StableDiffusionPipeline.from_pretrained
loads it as-is (U-Net, VAE, CLIPTextModel, a PreTrainedTokenizerFast with the word-level
tokenizer.json, EulerDiscreteScheduler), and its images follow their prompts in diffusers as in
sd-rs. Writes PNGs and a prompts.jsonl that scripts/eval_prompt_following.py scores:

  scripts/.venv/bin/python scripts/diffusers_default_model.py --out /tmp/diffusers-samples
  scripts/.venv/bin/python scripts/eval_prompt_following.py --jsonl /tmp/diffusers-samples/prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

HERE = Path(__file__).resolve().parent
COLOURS = ["red", "blonde", "black", "brown", "blue", "pink", "green", "white", "purple", "orange"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=HERE.parent / "models" / "sd-rs-anime")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=10, help="images per hair colour")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance-scale", type=float, default=4.0)
    args = ap.parse_args()

    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for colour in COLOURS:
        prompt = f"anime girl, {colour} hair"
        generator = torch.Generator().manual_seed(0)
        images = pipe(
            [prompt] * args.seeds,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            generator=generator,
        ).images
        for i, image in enumerate(images):
            name = f"{colour}-{i:02d}.png"
            image.save(args.out / name)
            lines.append(json.dumps({"file": name, "prompt": prompt}))
        print(f"{prompt}: {len(images)} images {images[0].size}")
    (args.out / "prompts.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
