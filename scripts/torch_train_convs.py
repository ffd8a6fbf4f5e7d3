"""PyTorch's side of `cargo run --release --example train_convs` (examples/train_convs.rs): the
forward and backward passes of every convolution of the small bench U-Net's training step
(batch 32, 16x16 latents), the same `sin` inputs, as many threads as the machine has, fp32.

    scripts/.venv/bin/python scripts/torch_train_convs.py
"""
import os
import time

import torch

# (convolutions of this shape in one step, batch, channels in, size, channels out, kernel, stride),
# as forward hooks on diffusers' UNet2DConditionModel of data/bench/small record them.
CONVS = [(1, 32, 4, 16, 64, 3, 1), (4, 32, 64, 16, 64, 3, 1), (6, 32, 64, 16, 64, 1, 1),
         (1, 32, 64, 16, 64, 3, 2), (1, 32, 64, 8, 128, 3, 1), (4, 32, 128, 8, 128, 3, 1),
         (1, 32, 64, 8, 128, 1, 1), (6, 32, 128, 8, 128, 1, 1), (1, 32, 128, 8, 128, 3, 2),
         (8, 32, 128, 4, 128, 3, 1), (2, 32, 128, 4, 128, 1, 1), (2, 32, 256, 4, 128, 3, 1),
         (2, 32, 256, 4, 128, 1, 1), (1, 32, 256, 8, 128, 3, 1), (1, 32, 256, 8, 128, 1, 1),
         (1, 32, 192, 8, 128, 3, 1), (1, 32, 192, 8, 128, 1, 1), (1, 32, 128, 16, 128, 3, 1),
         (1, 32, 192, 16, 64, 3, 1), (1, 32, 192, 16, 64, 1, 1), (1, 32, 128, 16, 64, 3, 1),
         (1, 32, 128, 16, 64, 1, 1), (1, 32, 64, 16, 4, 3, 1)]


def pattern(n, k):
    return torch.sin(torch.arange(n, dtype=torch.float32) * k)


def best_of(runs, f):
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    torch.set_num_threads(os.cpu_count())
    print(f"threads: {torch.get_num_threads()}")
    fwd_total = bwd_total = 0.0
    for count, b, c, size, c_out, k, stride in CONVS:
        x = pattern(b * c * size * size, 0.37).reshape(b, c, size, size).requires_grad_()
        w = (pattern(c_out * c * k * k, 0.11).reshape(c_out, c, k, k) * 0.05).requires_grad_()
        bias = pattern(c_out, 0.3).requires_grad_()
        conv = lambda: torch.nn.functional.conv2d(x, w, bias, stride, k // 2)
        with torch.no_grad():
            y = conv()
            fwd = best_of(6, conv)
        dy = pattern(y.numel(), 0.23).reshape(y.shape)

        def backward():
            x.grad = w.grad = bias.grad = None
            conv().backward(dy)

        # The backward alone: forward-and-backward minus the forward in the same graph mode.
        def forward():
            conv()

        bwd = best_of(6, backward) - best_of(6, forward)
        backward()
        print(f"{count} x b {b} c {c:3} {size:2}x{size:<2} -> {c_out:3} k {k} s {stride}: fwd {fwd * 1e3:6.2f} ms "
              f"bwd {bwd * 1e3:6.2f} ms (means {y.mean().item():.5f} {x.grad.mean().item():.5f} {w.grad.mean().item():.5f})")
        fwd_total += count * fwd
        bwd_total += count * bwd
    print(f"one step's convolutions: fwd {fwd_total * 1e3:.1f} ms bwd {bwd_total * 1e3:.1f} ms "
          f"total {(fwd_total + bwd_total) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
