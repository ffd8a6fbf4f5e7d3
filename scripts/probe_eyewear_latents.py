#!/usr/bin/env python3
"""Do the VAE's latents carry eyewear? A linear probe on the encoder's latents of training images.

Encodes the first --count images of the avatar data set with the model's VAE (diffusers
AutoencoderKL, latent means), fits a multinomial logistic regression (none / glasses / sunglasses)
on all but the last --held-out of them and prints its accuracy per class on those held out. High
accuracy means the information is in the latents, so a U-Net that does not draw eyewear is
limited by itself (its training), not by the VAE's encoder.

With --reconstructions DIR it also decodes the held-out images' latents again and writes them,
with their attributes.jsonl, to DIR: scripts/eval_prompt_following.py --attributes
DIR/attributes.jsonl then measures how much eyewear the decoder can draw at best.

  scripts/.venv/bin/python scripts/probe_eyewear_latents.py --data ~/sd-rs-runs/avatars
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

HERE = Path(__file__).resolve().parent
CLASSES = ["none", "glasses", "sunglasses"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="the rendered data set (with attributes.jsonl)")
    ap.add_argument("--vae", type=Path, default=HERE.parent / "models" / "sd-rs-anime" / "vae")
    ap.add_argument("--count", type=int, default=6000)
    ap.add_argument("--held-out", type=int, default=1000)
    ap.add_argument("--reconstructions", type=Path, help="write the held-out images' VAE round trips here")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)

    with open(args.data / "attributes.jsonl") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(args.count))]
    labels = torch.tensor([CLASSES.index(r["glasses"]) for r in rows])
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    latents = []
    with torch.no_grad():
        for i in range(0, len(rows), 200):
            pixels = np.stack([np.asarray(Image.open(args.data / r["file_name"]).convert("RGB")) for r in rows[i : i + 200]])
            x = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
            latents.append(vae.encode(x).latent_dist.mean)
    n = len(rows) - args.held_out
    if args.reconstructions:
        write_reconstructions(vae, torch.cat(latents)[n:], rows[n:], args.reconstructions)
    x = torch.cat(latents).flatten(1)
    x = (x - x[:n].mean(0)) / (x[:n].std(0) + 1e-6)

    w = torch.zeros(x.shape[1], len(CLASSES), requires_grad=True)
    b = torch.zeros(len(CLASSES), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(500):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:n] @ w + b, labels[:n]) + 1e-3 * (w**2).sum()
        loss.backward()
        opt.step()

    predicted = (x[n:] @ w + b).argmax(1)
    truth = labels[n:]
    print(f"linear probe on {tuple(x.shape[1:])} latent values, trained on {n} images, tested on {len(truth)}:")
    for k, name in enumerate(CLASSES):
        mask = truth == k
        print(f"  {name:<11} {int(mask.sum()):5d} images  {100 * (predicted[mask] == k).float().mean():5.1f}% correct")
    print(f"  all         {len(truth):5d} images  {100 * (predicted == truth).float().mean():5.1f}% correct")


def write_reconstructions(vae: AutoencoderKL, latents: torch.Tensor, rows: list[dict], out: Path) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), open(out / "attributes.jsonl", "w") as f:
        for i in range(0, len(rows), 200):
            images = vae.decode(latents[i : i + 200]).sample.clamp(-1, 1)
            images = ((images.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
            for r, image in zip(rows[i : i + 200], images):
                name = "images/" + Path(r["file_name"]).name
                Image.fromarray(image).save(out / name)
                f.write(json.dumps({**r, "file_name": name}) + "\n")
    print(f"wrote {len(rows)} VAE round trips to {out}")


if __name__ == "__main__":
    main()
