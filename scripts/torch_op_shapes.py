"""PyTorch's side of `cargo run --release --example op_shapes` (examples/op_shapes.rs): the same
linear layers (F.linear) and attention (F.scaled_dot_product_attention) on SD 1.5's shapes, the
same inputs, as many threads as the machine has (as sd-rs's rayon pool), in fp32.

    scripts/.venv/bin/python scripts/torch_op_shapes.py
"""
import os
import time

import torch

LINEAR = [(154, 768, 768), (154, 2304, 768), (154, 3072, 768), (154, 768, 3072),
          (8192, 320, 320), (8192, 2560, 320), (8192, 320, 1280),
          (2048, 640, 640), (2048, 5120, 640), (2048, 640, 2560),
          (512, 1280, 1280), (512, 10240, 1280), (512, 1280, 5120),
          (2048, 320, 320), (2048, 2560, 320), (2048, 320, 1280),
          (512, 640, 640), (512, 5120, 640), (512, 640, 2560),
          (128, 1280, 1280), (128, 10240, 1280), (128, 1280, 5120)]
ATTENTION = [(4096, 4096, 40), (4096, 77, 40), (1024, 1024, 80), (256, 256, 160)]


def pattern(n, k):
    return torch.sin(torch.arange(n, dtype=torch.float32) * k)


def best_of(runs, f):
    best, out = float("inf"), None
    for _ in range(runs):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out.mean().item()


def main():
    torch.set_num_threads(os.cpu_count())
    print(f"threads: {torch.get_num_threads()}")
    with torch.inference_mode():
        for m, n, k in LINEAR:
            x = pattern(m * k, 0.37).reshape(m, k)
            w = pattern(n * k, 0.11).reshape(n, k) * 0.05
            b = pattern(n, 0.3)
            t, mean = best_of(8, lambda: torch.nn.functional.linear(x, w, b))
            print(f"linear m {m:5} n {n:5} k {k:5}: {t * 1e3:8.2f} ms {2 * m * n * k / t / 1e9:4.0f} GFLOP/s (mean {mean:.5f})")
        for nq, nk, d in ATTENTION:
            q = pattern(16 * nq * d, 0.37).reshape(2, 8, nq, d)
            k = pattern(16 * nk * d, 0.37).reshape(2, 8, nk, d)
            v = pattern(16 * nk * d, 0.23).reshape(2, 8, nk, d)
            t, mean = best_of(4, lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            print(f"attention q {nq:5} k {nk:5} d {d:4}: {t * 1e3:8.2f} ms (mean {mean:.5f})")


if __name__ == "__main__":
    main()
