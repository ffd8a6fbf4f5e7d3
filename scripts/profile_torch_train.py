#!/usr/bin/env python3
"""PyTorch's side of `sd-rs bench --case train --profile`: the same training step (text encoder
and U-Net of a bench model, batch 32, MSE, backward, AdamW) under torch.profiler, with the time
per aten op and per step, for comparing layer by layer (BENCHMARKS.md, "Profiling by layer").

    scripts/.venv/bin/python scripts/profile_torch_train.py data/bench/small --threads 2
"""
import argparse
import json
import os

import torch
from diffusers import UNet2DConditionModel
from torch.profiler import ProfilerActivity, profile
from transformers import CLIPTextModel


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a bench model folder with unet/ and text_encoder/ (scripts/make_bench_models.py)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 untimed ones)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    unet = UNet2DConditionModel.from_pretrained(os.path.join(args.model, "unet")).train()
    encoder = CLIPTextModel.from_pretrained(os.path.join(args.model, "text_encoder")).train()
    cfg = json.load(open(os.path.join(args.model, "text_encoder", "config.json")))
    opt = torch.optim.AdamW(list(unet.parameters()) + list(encoder.parameters()), lr=1e-4, weight_decay=0.01)
    b, size = args.batch, unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(b, unet.config.in_channels, size, size, generator=g)
    eps = torch.randn(b, unet.config.in_channels, size, size, generator=g)
    t = torch.tensor([float((i * 37) % 1000) for i in range(b)])
    length, words = cfg["max_position_embeddings"], max(cfg["vocab_size"] - 4, 1)
    ids = torch.tensor([
        [cfg["bos_token_id"]] + [4 + (i * 7 + j) % words for j in range(10)] + [cfg["eos_token_id"]]
        + [cfg["pad_token_id"]] * (length - 12)
        for i in range(b)
    ])

    def step():
        opt.zero_grad(set_to_none=True)
        context = encoder(ids).last_hidden_state
        loss = ((unet(z_t, t, encoder_hidden_states=context).sample - eps) ** 2).mean()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6 / args.steps
    print(f"per step ({total:.4f} s of self CPU time, {args.threads} threads):")
    for e in events[:25]:
        s = e.self_cpu_time_total / 1e6 / args.steps
        print(f"  {s:8.4f} s {100 * s / total:5.1f}%  {e.count / args.steps:6.1f} calls  {e.key}")


if __name__ == "__main__":
    main()
