"""PyTorch's side of `cargo run --release --example train_attention`: scaled_dot_product_attention
forward and backward on the small bench U-Net's training shapes (batch 32), the same `sin`
inputs, as many threads as the machine has, fp32.

    scripts/.venv/bin/python scripts/torch_train_attention.py
"""
import os
import time

import torch

# (attentions of this shape in one step, query tokens, key tokens, heads, head width)
ATTENTION = [(3, 256, 256, 8, 8), (3, 256, 32, 8, 8), (3, 64, 64, 8, 16), (3, 64, 32, 8, 16), (1, 16, 16, 8, 16)]


def pattern(n, k):
    return torch.sin(torch.arange(n, dtype=torch.float32) * k)


def main():
    torch.set_num_threads(os.cpu_count())
    print(f"threads: {torch.get_num_threads()}")
    fwd_total = bwd_total = 0.0
    b = 32
    for count, nq, nk, heads, d in ATTENTION:
        # Made in the token layout (B, N, heads * d), as sd-rs takes them, then viewed as heads.
        q = pattern(b * nq * heads * d, 0.37).reshape(b, nq, heads * d).requires_grad_()
        k = pattern(b * nk * heads * d, 0.41).reshape(b, nk, heads * d).requires_grad_()
        v = pattern(b * nk * heads * d, 0.23).reshape(b, nk, heads * d).requires_grad_()
        dy = pattern(b * nq * heads * d, 0.19).reshape(b, nq, heads * d)
        split = lambda x: x.view(b, x.shape[1], heads, d).transpose(1, 2)
        fwd = bwd = float("inf")
        for _ in range(8):
            q.grad = k.grad = v.grad = None
            t = time.perf_counter()
            y = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
            y = y.transpose(1, 2).reshape(b, nq, heads * d)
            fwd = min(fwd, time.perf_counter() - t)
            t = time.perf_counter()
            y.backward(dy)
            bwd = min(bwd, time.perf_counter() - t)
        print(f"{count} x q {nq:3} k {nk:3} heads {heads} d {d:2}: fwd {fwd * 1e3:6.2f} ms bwd {bwd * 1e3:6.2f} ms "
              f"(means {y.mean().item():.6f} {q.grad.mean().item():.6f})")
        fwd_total += count * fwd
        bwd_total += count * bwd
    print(f"one step's attention: fwd {fwd_total * 1e3:.1f} ms bwd {bwd_total * 1e3:.1f} ms "
          f"total {(fwd_total + bwd_total) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
