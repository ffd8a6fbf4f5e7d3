#!/usr/bin/env python3
"""sd-rs against diffusers/PyTorch, side by side, on identical weights and inputs.

Run from the repository root, after `cargo build --release` and
`scripts/.venv/bin/python scripts/make_bench_models.py`:

    scripts/.venv/bin/python scripts/bench.py --quick              # 256x256, fewer repeats
    scripts/.venv/bin/python scripts/bench.py                      # 512x512 (see --help for time)
    scripts/.venv/bin/python scripts/bench.py --cases unet,train --markdown

Each case runs twice, once as `target/release/sd-rs bench --case CASE` and once as this script in
worker mode (`--worker CASE`, diffusers in fp32), each in its OWN process, so the peak resident
memory (the child's ru_maxrss from wait4) belongs to that case alone. Both processes load the same
files from data/bench/ (random weights in SD 1.5's shapes, and the shipped default model's small
U-Net and text encoder for training), build the same deterministic inputs (sin(k * i) over the
flat index; token ids from a formula), run on the same number of threads (RAYON_NUM_THREADS for
sd-rs, torch.set_num_threads for PyTorch) and print one JSON line: the median of the timed runs,
every timing, the shapes, and output statistics that show both computed the same function.

--markdown rewrites one generated block of BENCHMARKS.md (between its bench.py markers: "quick"
for --quick, "full" for a default run, "custom" for anything else) with the table, the machine,
the command, load averages, date and versions; the rest of the file, notes included, is kept.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD_RS = os.path.join(ROOT, "target", "release", "sd-rs")
SD15 = os.path.join(ROOT, "data", "bench", "sd15")
SMALL = os.path.join(ROOT, "data", "bench", "small")
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")
LAST_RUN = os.path.join(ROOT, "data", "bench", "last_run.json")

# The same prompt as src/cli/bench.rs (passed explicitly to both sides anyway).
PROMPT = (
    "masterpiece, best quality, anime girl with long red hair and blue eyes, a photo of the horse"
)
CASES = ["unet", "vae-decode", "text", "generate", "train", "load"]


def plan(args):
    """The work of each case: model, sizes, batch, runs (identical for both tools).

    At 512x512 one U-Net step or VAE decode takes 30-80 s per tool on 2 cores, so those run once
    without a warm-up there (the first run is not slower: see the warm-up timings of --quick);
    20 generate steps at 512x512 would take ~15 minutes per tool, so generate runs at 256x256
    unless --generate-size says otherwise.
    """
    size = 256 if args.quick else 512
    gen = args.generate_size or 256
    big_runs = dict(warmup=1, repeat=2) if args.quick else dict(warmup=0, repeat=1)
    cases = {
        "unet": dict(
            label=f"U-Net step {size}x{size}, batch 2 (guidance pair)",
            model=SD15, width=size, height=size, batch=2, **big_runs,
        ),
        "vae-decode": dict(
            label=f"VAE decode {size}x{size}, batch 1",
            model=SD15, width=size, height=size, batch=1, **big_runs,
        ),
        "text": dict(
            label="text encoding, batch 2 x 77 tokens",
            model=SD15, batch=2, warmup=1, repeat=5 if args.quick else 10, rounds=2,
        ),
        "generate": dict(
            label=f"generate {gen}x{gen}, {args.steps} Euler steps, CFG, 1 image",
            model=SD15, width=gen, height=gen, batch=1, steps=args.steps, warmup=0, repeat=1,
        ),
        "train": dict(
            label="train step, small U-Net + text encoder, batch 32",
            model=SMALL, batch=32, warmup=1, repeat=3 if args.quick else 5, rounds=2,
        ),
        "load": dict(
            label="load the SD 1.5-shaped pipeline (4.3 GB fp32)",
            model=SD15, warmup=1, repeat=2 if args.quick else 3, rounds=2,
        ),
    }
    if args.repeat:
        for c in cases.values():
            c["repeat"] = args.repeat
    return cases


# ---------------------------------------------------------------------------------------------
# Worker mode: the PyTorch side of one case, in this (fresh) process.


def pattern(torch, shape, k):
    n = 1
    for s in shape:
        n *= s
    return torch.sin(torch.arange(n, dtype=torch.float32) * k).reshape(shape)


def stats(x):
    x = x.float()
    return {"mean": x.mean().item(), "mean_abs": x.abs().mean().item()}


def time_runs(w, f):
    """Runs f warmup + repeat times; returns the timed runs' seconds and the last output (the
    warm-up runs' seconds go to WARMUP_TIMES, reported too)."""
    times, out = [], None
    for i in range(w.warmup + w.repeat):
        start = time.perf_counter()
        out = f()
        (WARMUP_TIMES if i < w.warmup else times).append(time.perf_counter() - start)
    return times, out


WARMUP_TIMES = []


def worker(w):
    import torch

    torch.set_num_threads(w.threads)
    torch.manual_seed(0)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel, CLIPTokenizer

    diffusers_logging.disable_progress_bar()
    f32 = torch.float32
    check, shapes = {}, {}
    if w.worker == "unet":
        unet = UNet2DConditionModel.from_pretrained(os.path.join(w.model, "unet"), dtype=f32).eval()
        f = 2 ** (len(json.load(open(os.path.join(w.model, "vae", "config.json")))["block_out_channels"]) - 1)
        sample = pattern(torch, (w.batch, unet.config.in_channels, w.height // f, w.width // f), 0.01)
        t = torch.full((w.batch,), 500.0)
        ctx_len = json.load(open(os.path.join(w.model, "text_encoder", "config.json")))["max_position_embeddings"]
        context = pattern(torch, (w.batch, ctx_len, unet.config.cross_attention_dim), 0.003)
        with torch.inference_mode():
            times, out = time_runs(w, lambda: unet(sample, t, encoder_hidden_states=context).sample)
        shapes = {"sample": list(sample.shape), "context": list(context.shape), "timestep": 500}
        check = stats(out)
    elif w.worker == "vae-decode":
        vae = AutoencoderKL.from_pretrained(os.path.join(w.model, "vae"), dtype=f32).eval()
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        latents = pattern(torch, (w.batch, vae.config.latent_channels, w.height // f, w.width // f), 0.01)
        with torch.inference_mode():
            times, image = time_runs(w, lambda: vae.decode(latents / vae.config.scaling_factor).sample)
        shapes = {"latents": list(latents.shape), "image": list(image.shape)}
        check = stats(image)
    elif w.worker == "text":
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(w.model, "tokenizer"))
        encoder = CLIPTextModel.from_pretrained(os.path.join(w.model, "text_encoder"), dtype=f32).eval()
        texts = ["" if i % 2 == 0 else w.prompt for i in range(w.batch)]

        def encode():
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            return encoder(ids)[0]

        with torch.inference_mode():
            times, context = time_runs(w, encode)
        shapes = {"prompts": w.batch, "context": list(context.shape)}
        check = stats(context)
    elif w.worker == "generate":
        pipe = StableDiffusionPipeline.from_pretrained(w.model, dtype=f32, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)

        def run():
            return pipe(w.prompt, negative_prompt="", num_inference_steps=w.steps, guidance_scale=7.5,
                        height=w.height, width=w.width, num_images_per_prompt=w.batch,
                        generator=torch.Generator().manual_seed(0)).images

        with torch.inference_mode():
            times, images = time_runs(w, run)
        shapes = {"images": len(images), "width": w.width, "height": w.height, "steps": w.steps,
                  "guidance_scale": 7.5, "sampler": type(pipe.scheduler).__name__}
    elif w.worker == "train":
        unet = UNet2DConditionModel.from_pretrained(os.path.join(w.model, "unet"), dtype=f32).train()
        te_cfg = json.load(open(os.path.join(w.model, "text_encoder", "config.json")))
        encoder = CLIPTextModel.from_pretrained(os.path.join(w.model, "text_encoder"), dtype=f32).train()
        params = list(unet.parameters()) + list(encoder.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        size = unet.config.sample_size
        shape = (w.batch, unet.config.in_channels, size, size)
        z0, eps = pattern(torch, shape, 0.01), pattern(torch, shape, 0.013)
        z_t = z0 * 0.8 + eps * 0.6
        t = torch.tensor([float((i * 37) % 1000) for i in range(w.batch)])
        length, words = te_cfg["max_position_embeddings"], max(te_cfg["vocab_size"] - 4, 1)
        rows = []
        for i in range(w.batch):
            row = [te_cfg["bos_token_id"]] + [4 + (i * 7 + j) % words for j in range(10)] + [te_cfg["eos_token_id"]]
            rows.append(row + [te_cfg["pad_token_id"]] * (length - len(row)))
        ids = torch.tensor(rows)
        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            context = encoder(ids).last_hidden_state
            prediction = unet(z_t, t, encoder_hidden_states=context).sample
            loss = ((prediction - eps) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())

        times, _ = time_runs(w, step)
        shapes = {"batch": w.batch, "latents": list(shape), "token_ids": [w.batch, length],
                  "trained_parameters": sum(p.numel() for p in params)}
        med = sorted(times)[len(times) // 2] if len(times) % 2 else sum(sorted(times)[len(times) // 2 - 1:len(times) // 2 + 1]) / 2
        check = {"samples_per_s": w.batch / med, "first_loss": losses[0], "losses": losses}
    elif w.worker == "load":

        def load():
            pipe = StableDiffusionPipeline.from_pretrained(w.model, dtype=f32, safety_checker=None)
            del pipe
            gc.collect()

        times, _ = time_runs(w, load)
        shapes = {"model": os.path.basename(w.model)}
    else:
        raise SystemExit(f"unknown case {w.worker}")
    print(json.dumps({
        "tool": "pytorch", "case": w.worker, "median_s": median(times), "times_s": times,
        "warmup_s": WARMUP_TIMES, "shapes": shapes, "check": check, "threads": torch.get_num_threads(),
        "dtype": "f32",
    }))


# ---------------------------------------------------------------------------------------------
# Driver mode.


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def busy_seconds():
    """CPU seconds the whole machine has spent busy since boot (/proc/stat's first line)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_idle(limit_s, window_s=3.0, threshold=0.25):
    """Waits (up to limit_s) until other processes keep less than `threshold` cores busy over a
    `window_s` window; returns the seconds waited."""
    start = time.time()
    while time.time() - start < limit_s:
        b0 = busy_seconds()
        time.sleep(window_s)
        if (busy_seconds() - b0) / window_s < threshold:
            break
    return time.time() - start


def set_priority(nice):
    """In a child before exec: run at `nice`. On a shared machine other jobs take cores mid-run;
    a higher priority (negative nice, as root) keeps both tools' threads running, so the numbers
    measure the tools rather than the jobs. With the kernel's autogroups (sched_autogroup), nice
    only ranks processes within their session, so the child starts a session of its own and sets
    that session's autogroup nice too."""
    os.setsid()
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass
    os.setpriority(os.PRIO_PROCESS, 0, nice)


def run_child(cmd, env, timeout, nice=None):
    """Runs one case in its own process. Returns its JSON result (None on failure), its peak RSS
    in MiB, the error, and how busy the machine was: load averages before and after, and the
    cores other processes kept busy meanwhile (machine busy time minus the child's CPU time)."""
    load0, busy0, t0 = os.getloadavg()[0], busy_seconds(), time.time()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        preexec = None if nice is None else (lambda: set_priority(nice))
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, preexec_fn=preexec)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    wall = time.time() - t0
    others = max(0.0, busy_seconds() - busy0 - usage.ru_utime - usage.ru_stime) / wall
    run = {"result": None, "rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
           "error": None, "wall_s": wall, "others_cores": others,
           "loadavg": [load0, os.getloadavg()[0]]}
    for line in stdout.splitlines():
        if line.startswith("{"):
            run["result"] = json.loads(line)
    if code != 0 or run["result"] is None:
        why = "timed out" if time.time() > deadline else f"exit {code}"
        tail = [l for l in stderr.strip().splitlines() if l.strip()][-1:] or [""]
        run["result"], run["error"] = None, f"{why}: {tail[0][:200]}"
    return run


def merge_runs(runs):
    """One tool's rounds of a case as one: timings pooled (median over all), the largest peak
    RSS, the first error, load from the first start to the last end, others' cores averaged."""
    ok = [r["result"] for r in runs if r["result"]]
    merged = {
        "rss_mb": max(r["rss_mb"] for r in runs),
        "error": next((r["error"] for r in runs if r["error"]), None),
        "wall_s": sum(r["wall_s"] for r in runs),
        "others_cores": sum(r["others_cores"] * r["wall_s"] for r in runs) / sum(r["wall_s"] for r in runs),
        "loadavg": [runs[0]["loadavg"][0], runs[-1]["loadavg"][1]],
        "waited_s": sum(r["waited_s"] for r in runs),
        "rounds": len(runs),
        "result": None,
    }
    if ok and not merged["error"]:
        result = dict(ok[0])
        result["times_s"] = [t for r in ok for t in r["times_s"]]
        result["warmup_s"] = [t for r in ok for t in r["warmup_s"]]
        result["median_s"] = median(result["times_s"])
        if "samples_per_s" in result.get("check", {}):
            result["check"] = dict(result["check"],
                                   samples_per_s=result["shapes"]["batch"] / result["median_s"])
        merged["result"] = result
    return merged


def sd_rs_cmd(name, c, args):
    cmd = [SD_RS, "bench", "--case", name, "--model", c["model"], "--device", "cpu", "--dtype", "f32",
           "--warmup", str(c["warmup"]), "--repeat", str(c["repeat"]), "--prompt", PROMPT]
    for key in ["width", "height", "batch", "steps"]:
        if key in c:
            cmd += [f"--{key}", str(c[key])]
    return cmd


def torch_cmd(name, c, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model", c["model"],
           "--threads", str(args.threads), "--warmup", str(c["warmup"]), "--repeat", str(c["repeat"]),
           "--prompt", PROMPT]
    for key in ["width", "height", "batch", "steps"]:
        if key in c:
            cmd += [f"--{key}", str(c[key])]
    return cmd


def fmt_time(s):
    if s is None:
        return "-"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def fmt_mb(mb):
    return "-" if mb is None else (f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.0f} MiB")


def time_cell(result):
    """The median time, and the throughput where the case has one (training)."""
    rate = (result.get("check") or {}).get("samples_per_s")
    return fmt_time(result["median_s"]) + (f" ({rate:.1f} samples/s)" if rate else "")


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def table(rows):
    lines = [
        "| case | PyTorch time | sd-rs time | time sd-rs/PyTorch | PyTorch peak RSS | sd-rs peak RSS | RSS sd-rs/PyTorch | other processes' cores (PyTorch / sd-rs) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pt, rs = r["pytorch"], r["sd-rs"]
        pt_t = pt["result"]["median_s"] if pt["result"] else None
        rs_t = rs["result"]["median_s"] if rs["result"] else None
        pt_m = pt["rss_mb"] if pt["result"] else None
        rs_m = rs["rss_mb"] if rs["result"] else None
        pt_cell = time_cell(pt["result"]) if pt["result"] else f"failed ({pt['error']})"
        rs_cell = time_cell(rs["result"]) if rs["result"] else f"failed ({rs['error']})"
        lines.append(f"| {r['label']} | {pt_cell} | {rs_cell} | {ratio(rs_t, pt_t)} | "
                     f"{fmt_mb(pt_m)} | {fmt_mb(rs_m)} | {ratio(rs_m, pt_m)} | "
                     f"{pt['others_cores']:.2f} / {rs['others_cores']:.2f} |")
    return "\n".join(lines)


def details(rows):
    """Per case: every timing, the load average around it, and the output check."""
    lines = []
    for r in rows:
        parts = []
        for tool in ["pytorch", "sd-rs"]:
            res = r[tool]["result"]
            if not res:
                continue
            times = ", ".join(f"{t:.3f}" for t in res["times_s"])
            best = f"; min {min(res['times_s']):.3f} s" if len(res["times_s"]) > 1 else ""
            check = res.get("check") or {}
            extra = ""
            if "mean_abs" in check:
                extra = f"; output mean {check['mean']:.6g}, mean abs {check['mean_abs']:.6g}"
            if "samples_per_s" in check:
                extra = f"; {check['samples_per_s']:.1f} samples/s, first loss {check['first_loss']:.6f}"
            la = r[tool]["loadavg"]
            warm = ", ".join(f"{t:.3f}" for t in res["warmup_s"]) or "none"
            parts.append(f"{tool}: runs [{times}] s{best} (warm-up [{warm}]){extra}; "
                         f"load avg {la[0]:.2f} -> {la[1]:.2f}")
        shapes = (r["sd-rs"]["result"] or r["pytorch"]["result"] or {}).get("shapes", {})
        lines.append(f"- **{r['name']}** `{json.dumps(shapes)}`  \n  " + "  \n  ".join(parts))
    return "\n".join(lines)


def machine():
    cpu = "unknown CPU"
    flags = ""
    try:
        info = open("/proc/cpuinfo").read()
        m = re.search(r"model name\s*:\s*(.+)", info)
        cpu = m.group(1).strip() if m else cpu
        fl = re.search(r"flags\s*:\s*(.+)", info)
        if fl:
            have = set(fl.group(1).split())
            flags = " ".join(f for f in ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"] if f in have)
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s*(\d+)", open("/proc/meminfo").read()).group(1))
        mem = f"{kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs (nproc), {mem}, flags: {flags or '-'}; {platform.platform()}"


def versions():
    import diffusers
    import torch
    import transformers

    def out(cmd, strip=True):
        try:
            text = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout
            return text.strip() if strip else text
        except OSError:
            return "?"

    candle = "?"
    try:
        lock = open(os.path.join(ROOT, "Cargo.lock")).read()
        m = re.search(r'name = "candle-core"\nversion = "([^"]+)"', lock)
        candle = m.group(1) if m else "?"
    except OSError:
        pass
    # The binary is built from the working tree: name the commit and any uncommitted source.
    rev = out(["git", "rev-parse", "--short", "HEAD"])
    dirty = [l[3:] for l in out(["git", "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"], False).splitlines()]
    tree = f"git {rev}" + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "")
    built = os.path.getmtime(SD_RS)
    newer = [f for f in out(["git", "ls-files", "src"], False).splitlines()
             if os.path.getmtime(os.path.join(ROOT, f)) > built]
    tree += f", binary built {datetime.datetime.fromtimestamp(built, datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    if newer:
        tree += f" (older than {', '.join(newer)}: rebuild to measure the tree as it is)"
    return (f"{out([SD_RS, '--version'])} built from {tree} (candle {candle}, {out(['rustc', '--version'])}); "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")


def block_name(args):
    """Which generated block of BENCHMARKS.md a run refreshes: the quick or the full table, or a
    separate one for any other selection of cases and settings."""
    standard = (args.cases == ",".join(CASES) and args.generate_size is None and args.steps == 20
                and args.repeat is None and args.threads == os.cpu_count())
    if not standard:
        return "custom"
    return "quick" if args.quick else "full"


def write_markdown(text, name):
    """Replaces the text between this block's markers in BENCHMARKS.md (appends the block when
    it is missing); everything else in the file, the notes included, is kept."""
    begin, end = f"<!-- bench.py:begin {name} -->", f"<!-- bench.py:end {name} -->"
    old = open(BENCHMARKS_MD).read() if os.path.exists(BENCHMARKS_MD) else "# Benchmarks\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    with open(BENCHMARKS_MD + ".tmp", "w") as f:
        f.write(new)
    os.replace(BENCHMARKS_MD + ".tmp", BENCHMARKS_MD)


def main():
    p = argparse.ArgumentParser(
        description="sd-rs against diffusers/PyTorch on identical weights (see the module doc).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="On a 2-core x86 CPU (nothing else running, or --nice -10) a default run takes about "
               "7 minutes and --quick about 6 (the 256x256 generate case dominates both); "
               "--generate-size 512 makes that case about 11 minutes (20 full-size U-Net steps "
               "per tool). On a machine shared with other jobs, --nice -10 (as root) keeps them "
               "from distorting the numbers: PyTorch's OpenMP threads in particular slow down "
               "many-fold when another process takes a core.")
    p.add_argument("--quick", action="store_true", help="256x256 U-Net and VAE cases, fewer repeats")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--generate-size", type=int, default=None,
                   help="image side of the generate case (default 256: 20 steps at 512 cost minutes per tool on 2 cores)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the generate case")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per case (default: per case)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both tools (default: nproc)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per process before it is killed")
    p.add_argument("--nice", type=int, default=None,
                   help="run both tools' processes at this niceness (e.g. -10, as root, on a machine "
                        "shared with other jobs)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before each process, wait up to this long for other processes to use less "
                        "than a quarter of a core (on a shared machine)")
    p.add_argument("--markdown", action="store_true", help="write the table into BENCHMARKS.md")
    # Worker mode (one PyTorch case in this process); used by the driver.
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, help=argparse.SUPPRESS)
    p.add_argument("--height", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--prompt", default=PROMPT, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.repeat = args.repeat or 1
        return worker(args)

    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {CASES}")
    if not os.access(SD_RS, os.X_OK):
        sys.exit(f"{SD_RS} is missing: run `cargo build --release` first")
    for d in {plan(args)[n]["model"] for n in names}:
        if not os.path.isfile(os.path.join(d, "BUILT.json")):
            sys.exit(f"{d} is missing: run `scripts/.venv/bin/python scripts/make_bench_models.py` first")

    cases = plan(args)
    # RAYON_NUM_THREADS sets candle's (and the gemm crate's) thread count; sd-rs's own choice of
    # CANDLE_NUM_THREADS (candle's elementwise-op pool) is left to it.
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    command = "scripts/.venv/bin/python scripts/bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()
    print(f"# {command}\n# {machine()}\n# load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}",
          flush=True)
    rows = []
    for name in names:
        c = cases[name]
        row = {"name": name, "label": c["label"]}
        runs = {"pytorch": [], "sd-rs": []}
        # Cheap cases run in several rounds, alternating which tool goes first (ABBA), so that a
        # change in the machine's load hits both tools alike.
        for r in range(c.get("rounds", 1)):
            order = [("pytorch", torch_cmd(name, c, args)), ("sd-rs", sd_rs_cmd(name, c, args))]
            for tool, cmd in order if r % 2 == 0 else order[::-1]:
                waited = wait_idle(args.wait_idle)
                run = run_child(cmd, env, args.timeout, args.nice)
                run["waited_s"] = waited
                runs[tool].append(run)
                got = fmt_time(run["result"]["median_s"]) if run["result"] else f"FAILED {run['error']}"
                print(f"{name:>10} {tool:>7}: {got}, peak RSS {fmt_mb(run['rss_mb'])} (process "
                      f"{run['wall_s']:.0f} s, other processes {run['others_cores']:.2f} cores, "
                      f"load {run['loadavg'][0]:.2f})", flush=True)
        for tool, tool_runs in runs.items():
            row[tool] = merge_runs(tool_runs)
        rows.append(row)
    load_end = os.getloadavg()
    finished = datetime.datetime.now(datetime.timezone.utc)

    print()
    print(table(rows))
    with open(LAST_RUN, "w") as f:
        json.dump({"command": command, "rows": rows, "started": started.isoformat(),
                   "finished": finished.isoformat(), "load_start": load_start, "load_end": load_end}, f, indent=1)
    if args.markdown:
        mins = (finished - started).total_seconds() / 60
        text = "\n".join([
            f"Measured {started:%Y-%m-%d %H:%M} UTC ({mins:.0f} min) with:",
            "",
            "```sh",
            command,
            "```",
            "",
            f"- Machine: {machine()}",
            f"- Threads: {args.threads} for both tools (RAYON_NUM_THREADS / torch.set_num_threads); "
            f"both in fp32 on the CPU"
            + (f"; both at niceness {args.nice}" if args.nice is not None else ""),
            f"- Load average (1, 5, 15 min) at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; "
            f"at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}",
            f"- Versions: {versions()}",
            "",
            "Time is the median of the timed runs (after warm-up runs), excluding model loading except in "
            "the load case. Peak RSS is the whole process's (ru_maxrss of that case's own process: "
            "interpreter or binary, weights, activations). Ratios above 1 mean sd-rs is slower or "
            "bigger.",
            "",
            table(rows),
            "",
            "<details><summary>Every timing, load averages and output checks</summary>",
            "",
            details(rows),
            "",
            "</details>",
        ])
        write_markdown(text, block_name(args))
        print(f"\nwrote {BENCHMARKS_MD}")


if __name__ == "__main__":
    sys.exit(main())
