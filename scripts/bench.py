#!/usr/bin/env python3
"""sd-rs against diffusers/PyTorch, side by side, on identical weights and inputs.

Run from the repository root, after `cargo build --release` and
`scripts/.venv/bin/python scripts/make_bench_models.py`:

    scripts/.venv/bin/python scripts/bench.py --quick              # 256x256, fewer repeats
    scripts/.venv/bin/python scripts/bench.py                      # 512x512 (see --help for time)
    scripts/.venv/bin/python scripts/bench.py --cases unet,train --markdown

Each case runs twice, once as `target/release/sd-rs bench --case CASE` and once as this script in
worker mode (`--worker CASE`, diffusers in fp32 unless --dtype), each in its OWN process, so the peak resident
memory (the child's ru_maxrss from wait4) belongs to that case alone. Both processes load the same
files from data/bench/ (random weights in SD 1.5's shapes, and the shipped default model's small
U-Net and text encoder for training), build the same deterministic inputs (sin(k * i) over the
flat index; token ids from a formula), run on the same number of threads (RAYON_NUM_THREADS for
sd-rs, torch.set_num_threads for PyTorch) and print one JSON line: the median of the timed runs,
every timing, the shapes, and output statistics that show both computed the same function.

--markdown rewrites one generated block of BENCHMARKS.md (between its bench.py markers: "quick"
for --quick, "full" for a default run, "custom" for anything else) with the table, the machine,
the command, load averages, date and versions; the rest of the file, notes included, is kept.

On an NVIDIA GPU (`--device cuda`, with `--dtype f32|f16|bf16`) both tools run on cuda:0 in that
dtype (`sd-rs bench --device cuda:0 --dtype ...`; diffusers with `dtype=` and `.to("cuda")`), each
timed run ends with a device synchronisation, and the memory column is the most GPU memory
nvidia-smi reported for the case's process (polled every 0.1 s, CUDA context included). The cases
default to GPU sizes (512x512 U-Net, VAE and generate; more repeats; one round each), and the
Markdown block is "cuda-DTYPE" (plus "-quick" / "-custom"), under "## On a GPU" at the end of
BENCHMARKS.md. The GPU machine has no Rust toolchain, so point --sd-rs at the CUDA binary there and
keep its results with --json-out; --from-json prints (and with --markdown writes) the table from
that file on another machine without running anything:

    python3 scripts/bench.py --device cuda --dtype bf16 --sd-rs /tmp/bin/sd-rs --json-out OUT.json
    scripts/.venv/bin/python scripts/bench.py --from-json OUT.json --markdown
"""

import argparse
import contextlib
import datetime
import gc
import glob
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
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

    On the CPU, at 512x512 one U-Net step or VAE decode takes 30-80 s per tool on 2 cores, so
    those run once without a warm-up there (the first run is not slower: see the warm-up timings
    of --quick); 20 generate steps at 512x512 would take ~15 minutes per tool, so generate runs at
    256x256 unless --generate-size says otherwise.

    On a GPU generate runs at 512x512, with more warm-up and timed runs (a run takes
    milliseconds; the first ones pay for cuBLAS/cuDNN set-up and kernel loading), and each case
    in one round (a process costs seconds of start-up: CUDA context, imports, weights; the GPU
    machine runs nothing else).
    """
    size = 256 if args.quick else 512
    q = args.quick
    if args.device == "cuda":
        gen = args.generate_size or 512
        runs = {
            "big": dict(warmup=1, repeat=3) if q else dict(warmup=2, repeat=10),
            "text": dict(warmup=2, repeat=10 if q else 20),
            "generate": dict(warmup=1, repeat=2 if q else 3),
            "train": dict(warmup=3, repeat=10 if q else 20),
            "load": dict(warmup=1, repeat=2 if q else 3),
        }
        load_label = f"load the SD 1.5-shaped pipeline (4.3 GB fp32) to the GPU in {args.dtype}"
    else:
        gen = args.generate_size or 256
        runs = {
            "big": dict(warmup=1, repeat=2) if q else dict(warmup=0, repeat=1),
            "text": dict(warmup=1, repeat=5 if q else 10, rounds=2),
            "generate": dict(warmup=0, repeat=1),
            "train": dict(warmup=1, repeat=3 if q else 5, rounds=2),
            "load": dict(warmup=1, repeat=2 if q else 3, rounds=2),
        }
        load_label = "load the SD 1.5-shaped pipeline (4.3 GB fp32)"
    cases = {
        "unet": dict(
            label=f"U-Net step {size}x{size}, batch 2 (guidance pair)",
            model=SD15, width=size, height=size, batch=2, **runs["big"],
        ),
        "vae-decode": dict(
            label=f"VAE decode {size}x{size}, batch 1",
            model=SD15, width=size, height=size, batch=1, **runs["big"],
        ),
        "text": dict(label="text encoding, batch 2 x 77 tokens", model=SD15, batch=2, **runs["text"]),
        "generate": dict(
            label=f"generate {gen}x{gen}, {args.steps} Euler steps, CFG, 1 image",
            model=SD15, width=gen, height=gen, batch=1, steps=args.steps, **runs["generate"],
        ),
        "train": dict(
            label="train step, small U-Net + text encoder, batch 32", model=SMALL, batch=32, **runs["train"],
        ),
        "load": dict(label=load_label, model=SD15, **runs["load"]),
    }
    for c in cases.values():
        if args.repeat:
            c["repeat"] = args.repeat
        if args.rounds:
            c["rounds"] = args.rounds
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
    warm-up runs' seconds go to WARMUP_TIMES, reported too). On a GPU each run starts and ends
    with torch.cuda.synchronize(), so its time covers the kernels it queued (sd-rs waits for the
    device after each run likewise)."""
    times, out = [], None
    for i in range(w.warmup + w.repeat):
        SYNC()
        start = time.perf_counter()
        out = f()
        SYNC()
        (WARMUP_TIMES if i < w.warmup else times).append(time.perf_counter() - start)
    return times, out


WARMUP_TIMES = []
SYNC = lambda: None  # noqa: E731 (torch.cuda.synchronize on a GPU)
DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def worker(w):
    global SYNC
    import torch

    cuda = w.device == "cuda"
    if cuda and not torch.cuda.is_available():
        built = torch.version.cuda
        raise SystemExit(
            f"PyTorch {torch.__version__} sees no CUDA GPU ("
            + (f"built for CUDA {built}; no device or driver here" if built else "a CPU-only build")
            + "): run on a machine with an NVIDIA GPU, or with --device cpu")
    torch.set_num_threads(w.threads)
    torch.manual_seed(0)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel, CLIPTokenizer

    diffusers_logging.disable_progress_bar()
    f32 = torch.float32
    dt = getattr(torch, DTYPES[w.dtype])
    dev = torch.device("cuda:0" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
        SYNC = torch.cuda.synchronize

    def place(module, dtype):
        """The module on the device in dtype (a no-op on the CPU in f32; on the GPU this also
        holds if from_pretrained ignored dtype=). The dtype only where it differs: diffusers warns
        about any .to(dtype)."""
        return module.to(dev) if module.dtype == dtype else module.to(dev, dtype)

    def on_dev(x, dtype):
        return x.to(dev, dtype)

    # As sd-rs does (src/pipeline.rs): in f16 the VAE stays f32, where f16 overflows.
    vae_dt = f32 if dt == torch.float16 else dt

    def load_pipe():
        extra = {}
        if vae_dt != dt:
            extra["vae"] = AutoencoderKL.from_pretrained(os.path.join(w.model, "vae"), dtype=vae_dt)
        pipe = StableDiffusionPipeline.from_pretrained(w.model, dtype=dt, safety_checker=None, **extra)
        if cuda:
            pipe.to(dev)
        return pipe

    check, shapes = {}, {}
    if w.worker == "unet":
        unet = place(UNet2DConditionModel.from_pretrained(os.path.join(w.model, "unet"), dtype=dt), dt).eval()
        f = 2 ** (len(json.load(open(os.path.join(w.model, "vae", "config.json")))["block_out_channels"]) - 1)
        sample = on_dev(pattern(torch, (w.batch, unet.config.in_channels, w.height // f, w.width // f), 0.01), dt)
        t = on_dev(torch.full((w.batch,), 500.0), f32)
        ctx_len = json.load(open(os.path.join(w.model, "text_encoder", "config.json")))["max_position_embeddings"]
        context = on_dev(pattern(torch, (w.batch, ctx_len, unet.config.cross_attention_dim), 0.003), dt)
        with torch.inference_mode():
            times, out = time_runs(w, lambda: unet(sample, t, encoder_hidden_states=context).sample)
        shapes = {"sample": list(sample.shape), "context": list(context.shape), "timestep": 500}
        check = stats(out)
    elif w.worker == "vae-decode":
        vae = place(AutoencoderKL.from_pretrained(os.path.join(w.model, "vae"), dtype=vae_dt), vae_dt).eval()
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        latents = on_dev(pattern(torch, (w.batch, vae.config.latent_channels, w.height // f, w.width // f), 0.01), vae_dt)
        with torch.inference_mode():
            times, image = time_runs(w, lambda: vae.decode(latents / vae.config.scaling_factor).sample)
        shapes = {"latents": list(latents.shape), "image": list(image.shape)}
        check = stats(image)
    elif w.worker == "text":
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(w.model, "tokenizer"))
        encoder = place(CLIPTextModel.from_pretrained(os.path.join(w.model, "text_encoder"), dtype=dt), dt).eval()
        texts = ["" if i % 2 == 0 else w.prompt for i in range(w.batch)]

        def encode():
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            return encoder(on_dev(ids, ids.dtype))[0]

        with torch.inference_mode():
            times, context = time_runs(w, encode)
        shapes = {"prompts": w.batch, "context": list(context.shape)}
        check = stats(context)
    elif w.worker == "generate":
        pipe = load_pipe()
        pipe.set_progress_bar_config(disable=True)
        if vae_dt != dt:
            # The pipeline hands the VAE latents in the U-Net's dtype: decode them in the VAE's.
            decode = pipe.vae.decode
            pipe.vae.decode = lambda z, *a, **k: decode(z.to(vae_dt), *a, **k)

        def run():
            return pipe(w.prompt, negative_prompt="", num_inference_steps=w.steps, guidance_scale=7.5,
                        height=w.height, width=w.width, num_images_per_prompt=w.batch,
                        generator=torch.Generator().manual_seed(0)).images

        with torch.inference_mode():
            times, images = time_runs(w, run)
        shapes = {"images": len(images), "width": w.width, "height": w.height, "steps": w.steps,
                  "guidance_scale": 7.5, "sampler": type(pipe.scheduler).__name__}
    elif w.worker == "train":
        # f32 weights (AdamW's master copy), forward and backward under autocast in f16/bf16, as
        # `sd-rs train --mixed-precision bf16` and diffusers' training scripts do; with
        # --torch-train pure, weights, optimizer state and inputs in the dtype throughout (what
        # `sd-rs bench --case train --dtype ...` does).
        pure = w.torch_train == "pure"
        wdt = dt if pure else f32
        autocast = (torch.autocast(dev.type, dtype=dt) if dt != f32 and not pure
                    else contextlib.nullcontext())
        unet = place(UNet2DConditionModel.from_pretrained(os.path.join(w.model, "unet"), dtype=wdt), wdt).train()
        te_cfg = json.load(open(os.path.join(w.model, "text_encoder", "config.json")))
        encoder = place(CLIPTextModel.from_pretrained(os.path.join(w.model, "text_encoder"), dtype=wdt), wdt).train()
        params = list(unet.parameters()) + list(encoder.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        size = unet.config.sample_size
        shape = (w.batch, unet.config.in_channels, size, size)
        z0, eps = on_dev(pattern(torch, shape, 0.01), wdt), on_dev(pattern(torch, shape, 0.013), wdt)
        z_t = z0 * 0.8 + eps * 0.6
        t = on_dev(torch.tensor([float((i * 37) % 1000) for i in range(w.batch)]), f32)
        length, words = te_cfg["max_position_embeddings"], max(te_cfg["vocab_size"] - 4, 1)
        rows = []
        for i in range(w.batch):
            row = [te_cfg["bos_token_id"]] + [4 + (i * 7 + j) % words for j in range(10)] + [te_cfg["eos_token_id"]]
            rows.append(row + [te_cfg["pad_token_id"]] * (length - len(row)))
        ids = torch.tensor(rows)
        ids = on_dev(ids, ids.dtype)
        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                context = encoder(ids).last_hidden_state
                prediction = unet(z_t, t, encoder_hidden_states=context).sample
                loss = ((prediction - eps) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())

        times, _ = time_runs(w, step)
        shapes = {"batch": w.batch, "latents": list(shape), "token_ids": [w.batch, length],
                  "trained_parameters": sum(p.numel() for p in params)}
        precision = f"{w.dtype} throughout" if pure or dt == f32 else f"f32 weights, autocast {w.dtype}"
        med = sorted(times)[len(times) // 2] if len(times) % 2 else sum(sorted(times)[len(times) // 2 - 1:len(times) // 2 + 1]) / 2
        check = {"samples_per_s": w.batch / med, "first_loss": losses[0], "losses": losses}
    elif w.worker == "load":

        def load():
            pipe = load_pipe()
            del pipe
            gc.collect()

        times, _ = time_runs(w, load)
        shapes = {"model": os.path.basename(w.model)}
    else:
        raise SystemExit(f"unknown case {w.worker}")
    result = {
        "tool": "pytorch", "case": w.worker, "median_s": median(times), "times_s": times,
        "warmup_s": WARMUP_TIMES, "shapes": shapes, "check": check, "threads": torch.get_num_threads(),
        "dtype": w.dtype,
    }
    if w.worker == "train" and w.dtype != "f32":
        result["precision"] = precision
    if cuda:
        result["device"] = f"cuda:0 ({torch.cuda.get_device_name(dev)})"
        result["max_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        result["max_reserved_mb"] = torch.cuda.max_memory_reserved(dev) / 2**20
    print(json.dumps(result))


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


NVIDIA_SMI = shutil.which("nvidia-smi")


def smi(*query):
    """nvidia-smi's CSV rows for a query (no header, no units), or None where it fails."""
    if not NVIDIA_SMI:
        return None
    try:
        r = subprocess.run([NVIDIA_SMI, *query, "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return [[f.strip() for f in line.split(",")] for line in r.stdout.splitlines() if line.strip()]


def mib(text):
    try:
        return float(text)
    except ValueError:  # "[N/A]"
        return None


class GpuMemory(threading.Thread):
    """While a child runs, polls nvidia-smi every `interval` seconds and keeps the most GPU memory
    (MiB) the child's process used (its CUDA context included). Where nvidia-smi lists no process
    with the child's pid (in a container it may show the host's pids) it keeps the sum over the
    processes it lists, and where it lists none, the GPU's used memory minus what was used before
    the child started; `source` says which."""

    def __init__(self, interval=0.1):
        super().__init__(daemon=True)
        self.interval, self.pid = interval, None
        self.done = threading.Event()
        self.own = self.all = self.total = None
        base = smi("--query-gpu=memory.used")
        self.baseline = mib(base[0][0]) if base else None

    def watch(self, pid):
        self.pid = str(pid)
        self.start()

    def run(self):
        while not self.done.is_set():
            apps = smi("--query-compute-apps=pid,used_memory")
            if apps:
                own = [mib(row[1]) for row in apps if len(row) > 1 and row[0] == self.pid]
                own = [m for m in own if m is not None]
                if own:
                    self.own = max(self.own or 0.0, sum(own))
                every = [m for m in (mib(row[1]) for row in apps if len(row) > 1) if m is not None]
                if every:
                    self.all = max(self.all or 0.0, sum(every))
            elif apps is not None and self.baseline is not None:
                used = smi("--query-gpu=memory.used")
                if used and mib(used[0][0]) is not None:
                    self.total = max(self.total or 0.0, mib(used[0][0]) - self.baseline)
            self.done.wait(self.interval)

    def stop(self):
        """The peak in MiB (None where there is none) and where it came from."""
        self.done.set()
        if self.is_alive():
            self.join(15)
        if not NVIDIA_SMI:
            return None, "nvidia-smi not found"
        if self.own is not None:
            return self.own, "process"
        if self.all is not None:
            return self.all, "all processes on the GPU (the child's pid not listed)"
        if self.total is not None:
            return self.total, "GPU used memory minus the start (no processes listed)"
        return None, "nvidia-smi reported nothing"


def run_child(cmd, env, timeout, nice=None, gpu=False):
    """Runs one case in its own process. Returns its JSON result (None on failure), its peak RSS
    in MiB, the error, and how busy the machine was: load averages before and after, and the
    cores other processes kept busy meanwhile (machine busy time minus the child's CPU time).
    With gpu, also the most GPU memory nvidia-smi reported for the process (gpu_mb)."""
    load0, busy0, t0 = os.getloadavg()[0], busy_seconds(), time.time()
    poller = GpuMemory() if gpu else None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        preexec = None if nice is None else (lambda: set_priority(nice))
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, preexec_fn=preexec)
        if poller:
            poller.watch(proc.pid)
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
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    wall = time.time() - t0
    others = max(0.0, busy_seconds() - busy0 - usage.ru_utime - usage.ru_stime) / wall
    run = {"result": None, "rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
           "error": None, "wall_s": wall, "others_cores": others,
           "loadavg": [load0, os.getloadavg()[0]]}
    if poller:
        run["gpu_mb"], run["gpu_source"] = poller.stop()
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
    if "gpu_mb" in runs[0]:
        gpu = [r["gpu_mb"] for r in runs if r["gpu_mb"] is not None]
        merged["gpu_mb"] = max(gpu) if gpu else None
        merged["gpu_source"] = runs[0]["gpu_source"]
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
    device = "cuda:0" if args.device == "cuda" else "cpu"
    cmd = [SD_RS, "bench", "--case", name, "--model", c["model"], "--device", device, "--dtype", args.dtype,
           "--warmup", str(c["warmup"]), "--repeat", str(c["repeat"]), "--prompt", PROMPT]
    for key in ["width", "height", "batch", "steps"]:
        if key in c:
            cmd += [f"--{key}", str(c[key])]
    return cmd


def torch_cmd(name, c, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model", c["model"],
           "--threads", str(args.threads), "--warmup", str(c["warmup"]), "--repeat", str(c["repeat"]),
           "--prompt", PROMPT, "--device", args.device, "--dtype", args.dtype,
           "--torch-train", args.torch_train]
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


def table(rows, device="cpu"):
    """The table; on a GPU the memory columns are the GPU memory nvidia-smi reported."""
    if device == "cuda":
        key, what, short = "gpu_mb", "GPU memory", "GPU memory"
    else:
        key, what, short = "rss_mb", "peak RSS", "RSS"
    lines = [
        f"| case | PyTorch time | sd-rs time | time sd-rs/PyTorch | PyTorch {what} | sd-rs {what} | {short} sd-rs/PyTorch | other processes' cores (PyTorch / sd-rs) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pt, rs = r["pytorch"], r["sd-rs"]
        pt_t = pt["result"]["median_s"] if pt["result"] else None
        rs_t = rs["result"]["median_s"] if rs["result"] else None
        pt_m = pt.get(key) if pt["result"] else None
        rs_m = rs.get(key) if rs["result"] else None
        pt_cell = time_cell(pt["result"]) if pt["result"] else f"failed ({pt['error']})"
        rs_cell = time_cell(rs["result"]) if rs["result"] else f"failed ({rs['error']})"
        lines.append(f"| {r['label']} | {pt_cell} | {rs_cell} | {ratio(rs_t, pt_t)} | "
                     f"{fmt_mb(pt_m)} | {fmt_mb(rs_m)} | {ratio(rs_m, pt_m)} | "
                     f"{pt['others_cores']:.2f} / {rs['others_cores']:.2f} |")
    return "\n".join(lines)


def details(rows, device="cpu"):
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
            if device == "cuda":
                extra += f"; dtype {res.get('dtype', '?')}"
                if res.get("precision"):
                    extra += f" ({res['precision']})"
                extra += (f"; GPU memory {fmt_mb(r[tool].get('gpu_mb'))} ({r[tool].get('gpu_source')}), "
                          f"peak RSS {fmt_mb(r[tool]['rss_mb'])}")
                if "max_allocated_mb" in res:
                    extra += (f", torch max allocated {fmt_mb(res['max_allocated_mb'])} / "
                              f"reserved {fmt_mb(res['max_reserved_mb'])}")
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


def gpu_machine():
    """The GPU (nvidia-smi), the CUDA version PyTorch was built for, and the host."""
    rows = smi("--query-gpu=name,driver_version,memory.total")
    if rows:
        name, driver, total = (rows[0] + ["?", "?", "?"])[:3]
        gpu = f"{name} ({total} MiB, driver {driver})" + (f", 1 of {len(rows)} GPUs" if len(rows) > 1 else "")
    else:
        gpu = "unknown GPU (" + ("nvidia-smi failed" if NVIDIA_SMI else "no nvidia-smi") + ")"
    info = python_packages()
    cuda = f"PyTorch built for CUDA {info['cuda']}" if info else "PyTorch not importable"
    return f"GPU: {gpu}; {cuda}; host: {machine()}"


PACKAGES = {}


def python_packages():
    """torch's, diffusers' and transformers' versions (and the CUDA and cuDNN versions torch was
    built with), asked of a separate interpreter: importing them here would grow this process
    by ~1 GB, which every child forked from it would count in its ru_maxrss."""
    if not PACKAGES:
        code = ("import json, platform, torch, diffusers, transformers\n"
                "try:\n    cudnn = torch.backends.cudnn.version()\nexcept Exception:\n    cudnn = None\n"
                "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'cudnn': cudnn,"
                " 'diffusers': diffusers.__version__, 'transformers': transformers.__version__,"
                " 'python': platform.python_version()}))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, PYTHONWARNINGS="ignore"))
        lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
        if r.returncode != 0 or not lines:
            return None
        PACKAGES.update(json.loads(lines[-1]))
    return PACKAGES


def versions(device="cpu"):
    py = python_packages() or {k: "?" for k in ["torch", "cuda", "cudnn", "diffusers", "transformers", "python"]}

    def out(cmd, strip=True):
        try:
            text = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout
            return text.strip() if strip else text
        except OSError:
            return "?" if strip else ""

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
    if device == "cuda":
        # The CUDA binary was built elsewhere and unpacked here: its file date says nothing, and
        # this machine may have no git (nor rustc).
        tree = (f"working tree at git {rev}" if rev and rev != "?" else "working tree at an unknown commit")
        tree += f" with uncommitted changes to {', '.join(dirty)}" if dirty else ""
        return (f"{out([SD_RS, '--version'])} (CUDA build {SD_RS}; {tree}; candle {candle}); "
                f"torch {py['torch']} (CUDA {py['cuda']}, cuDNN {py['cudnn'] or '?'}), "
                f"diffusers {py['diffusers']}, transformers {py['transformers']}, "
                f"Python {py['python']}")
    tree = f"git {rev}" + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "")
    built = os.path.getmtime(SD_RS)
    newer = [f for f in out(["git", "ls-files", "src"], False).splitlines()
             if os.path.exists(os.path.join(ROOT, f)) and os.path.getmtime(os.path.join(ROOT, f)) > built]
    tree += f", binary built {datetime.datetime.fromtimestamp(built, datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    if newer:
        tree += f" (older than {', '.join(newer)}: rebuild to measure the tree as it is)"
    return (f"{out([SD_RS, '--version'])} built from {tree} (candle {candle}, {out(['rustc', '--version'])}); "
            f"torch {py['torch']}, diffusers {py['diffusers']}, "
            f"transformers {py['transformers']}, Python {py['python']}")


def block_name(args):
    """Which generated block of BENCHMARKS.md a run refreshes: the quick or the full table, or a
    separate one for any other selection of cases and settings; on a GPU "cuda-DTYPE" for the
    full table, "cuda-DTYPE-quick" and "cuda-DTYPE-custom"."""
    standard = (args.cases == ",".join(CASES) and args.generate_size is None and args.steps == 20
                and args.repeat is None and args.threads == os.cpu_count()
                and args.torch_train == "autocast")
    if args.device == "cuda":
        return f"cuda-{args.dtype}" + ("-custom" if not standard else "-quick" if args.quick else "")
    if not standard or args.dtype != "f32":
        return "custom"
    return "quick" if args.quick else "full"


GPU_SECTION = "## On a GPU"


def write_markdown(text, name, section=None, heading=None):
    """Replaces the text between this block's markers in BENCHMARKS.md (appends the block when
    it is missing, after `section` where the file has no such line yet, and `heading`);
    everything else in the file, the notes included, is kept."""
    begin, end = f"<!-- bench.py:begin {name} -->", f"<!-- bench.py:end {name} -->"
    old = open(BENCHMARKS_MD).read() if os.path.exists(BENCHMARKS_MD) else "# Benchmarks\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        intro = ""
        if section and section not in old.splitlines():
            intro += section + "\n\n"
        if heading:
            intro += heading + "\n\n"
        new = old.rstrip("\n") + "\n\n" + intro + block + "\n"
    with open(BENCHMARKS_MD + ".tmp", "w") as f:
        f.write(new)
    os.replace(BENCHMARKS_MD + ".tmp", BENCHMARKS_MD)


def markdown_text(doc):
    """The generated block for a run (from its JSON document, so that --from-json writes the
    same block on another machine)."""
    started = datetime.datetime.fromisoformat(doc["started"])
    finished = datetime.datetime.fromisoformat(doc["finished"])
    mins = (finished - started).total_seconds() / 60
    rows, load_start, load_end = doc["rows"], doc["load_start"], doc["load_end"]
    nice = doc.get("nice")
    device, dtype = doc.get("device", "cpu"), doc.get("dtype", "f32")
    head = [
        f"Measured {started:%Y-%m-%d %H:%M} UTC ({mins:.0f} min) with:",
        "",
        "```sh",
        doc["command"],
        "```",
        "",
        f"- Machine: {doc['machine']}",
    ]
    load = (f"- Load average (1, 5, 15 min) at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; "
            f"at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    tail = [
        table(rows, device),
        "",
        "<details><summary>Every timing, load averages and output checks</summary>",
        "",
        details(rows, device),
        "",
        "</details>",
    ]
    if device != "cuda":
        return "\n".join(head + [
            f"- Threads: {doc['threads']} for both tools (RAYON_NUM_THREADS / torch.set_num_threads); "
            f"both in {'fp32' if dtype == 'f32' else dtype} on the CPU"
            + (f"; both at niceness {nice}" if nice is not None else ""),
            load,
            f"- Versions: {doc['versions']}",
            "",
            "Time is the median of the timed runs (after warm-up runs), excluding model loading except in "
            "the load case. Peak RSS is the whole process's (ru_maxrss of that case's own process: "
            "interpreter or binary, weights, activations). Ratios above 1 mean sd-rs is slower or "
            "bigger.",
            "",
        ] + tail)
    torch_dt = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
    notes = []
    names = {r["name"] for r in rows}
    if dtype == "f16" and names & {"vae-decode", "generate", "load"}:
        notes.append("In f16 both tools keep the VAE in f32 (sd-rs always does, as f16 overflows in the "
                     "VAE decoder; diffusers is given an f32 VAE, and in generate its latents cast to f32 "
                     "for decoding), so the vae-decode case runs in f32 on both sides.")
    if dtype != "f32" and "train" in names:
        if doc.get("torch_train", "autocast") == "pure":
            notes.append(f"Train: both tools train in {dtype} throughout (weights, gradients and AdamW "
                         f"state in {dtype}, no f32 master weights).")
        else:
            notes.append(f"Train: `sd-rs bench --case train --dtype {dtype}` builds the trained U-Net and "
                         f"text encoder in {dtype} throughout (weights, gradients and AdamW state, no "
                         f"f32 master weights); PyTorch keeps f32 weights and AdamW state and runs the "
                         f"forward pass under `torch.autocast(\"cuda\", dtype=torch.{torch_dt})` (the "
                         f"backward follows its dtypes), as diffusers' training scripts do and as "
                         f"`sd-rs train --mixed-precision bf16` does for the U-Net. "
                         f"The train row therefore compares different precision recipes "
                         f"(`--torch-train pure` makes PyTorch's side {dtype} throughout too).")
    if dtype == "f32":
        notes.append("In f32 PyTorch keeps its defaults: cuDNN convolutions may use TF32 "
                     "(torch.backends.cudnn.allow_tf32), matrix multiplications do not.")
    return "\n".join(head + [
        f"- Device: cuda:0 in {dtype} for both tools (`sd-rs bench --device cuda:0 --dtype {dtype}`; "
        f"diffusers `from_pretrained(..., dtype=torch.{torch_dt})` then `.to(\"cuda\")`); "
        f"{doc['threads']} CPU threads" + (f"; both at niceness {nice}" if nice is not None else ""),
        load,
        f"- Versions: {doc['versions']}",
        "",
        "Time is the median of the timed runs (after warm-up runs), excluding model loading except in "
        "the load case; every run ends with a device synchronisation (torch.cuda.synchronize() / "
        "candle's Device::synchronize). GPU memory is the most nvidia-smi reported for the case's own "
        "process, polled every 0.1 s while it ran: the CUDA context, library workspaces, weights and "
        "activations, and for PyTorch what its caching allocator holds (the details give "
        "torch.cuda.max_memory_allocated too); peaks shorter than a poll can be missed. Ratios above 1 "
        "mean sd-rs is slower or bigger.",
        "",
    ] + [f"- {n}" for n in notes] + [""] + tail)


def torch_cuda_libs():
    """PyTorch's CUDA libraries (site-packages/nvidia/*/lib), where the CUDA build of sd-rs finds
    libcudart, cuBLAS, cuRAND, NVRTC and cuDNN on a machine without a CUDA toolkit."""
    spec = importlib.util.find_spec("torch")
    if not spec or not spec.origin:
        return []
    site = os.path.dirname(os.path.dirname(spec.origin))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))


def show(doc, markdown):
    """Prints a run's table (and on a GPU its details); with markdown, writes its block."""
    device = doc.get("device", "cpu")
    print()
    print(table(doc["rows"], device))
    if device == "cuda":
        print()
        print(details(doc["rows"], device))
    if markdown:
        if device == "cuda":
            write_markdown(markdown_text(doc), doc["block"], GPU_SECTION,
                           f"### CUDA, {doc['dtype']}" + {"quick": ", --quick", "custom": ", other settings"}
                           .get(doc["block"].rsplit("-", 1)[-1], ""))
        else:
            write_markdown(markdown_text(doc), doc["block"])
        print(f"\nwrote {BENCHMARKS_MD}")


def main():
    global SD_RS
    p = argparse.ArgumentParser(
        description="sd-rs against diffusers/PyTorch on identical weights (see the module doc).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="On a 2-core x86 CPU (nothing else running, or --nice -10) a default run takes about "
               "7 minutes and --quick about 6 (the 256x256 generate case dominates both); "
               "--generate-size 512 makes that case about 11 minutes (20 full-size U-Net steps "
               "per tool). On a machine shared with other jobs, --nice -10 (as root) keeps them "
               "from distorting the numbers: PyTorch's OpenMP threads in particular slow down "
               "many-fold when another process takes a core. On a GPU (--device cuda) the time is "
               "mostly the 12 processes' start-up (imports, CUDA context, loading 4.3 GB): a few "
               "minutes per dtype.")
    p.add_argument("--quick", action="store_true", help="256x256 U-Net and VAE cases, fewer repeats")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--generate-size", type=int, default=None,
                   help="image side of the generate case (default 256 on the CPU, where 20 steps at "
                        "512 cost minutes per tool on 2 cores; 512 on a GPU)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the generate case")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per case (default: per case)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds per case, the tools alternating ABBA (default: 2 for text, train and "
                        "load on the CPU, else 1); 2 for the slow cases puts both tools in the same "
                        "stretch of a machine whose speed drifts")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both tools (default: nproc)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where both tools run: the CPU, or the first CUDA GPU (sd-rs --device cuda:0)")
    p.add_argument("--dtype", choices=list(DTYPES), default="f32",
                   help="both tools' dtype (f16/bf16 are meant for --device cuda)")
    p.add_argument("--torch-train", choices=["autocast", "pure"], default="autocast",
                   help="PyTorch's train case in f16/bf16: f32 weights under torch.autocast (default), "
                        "or weights and optimizer in the dtype throughout, as sd-rs bench trains")
    p.add_argument("--sd-rs", default=SD_RS, metavar="PATH",
                   help="the sd-rs binary (default target/release/sd-rs; on a GPU machine the CUDA build)")
    p.add_argument("--timeout", type=int, default=None,
                   help="seconds per process before it is killed (default 1800, on a GPU 300)")
    p.add_argument("--nice", type=int, default=None,
                   help="run both tools' processes at this niceness (e.g. -10, as root, on a machine "
                        "shared with other jobs)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before each process, wait up to this long for other processes to use less "
                        "than a quarter of a core (on a shared machine)")
    p.add_argument("--markdown", action="store_true", help="write the table into BENCHMARKS.md")
    p.add_argument("--json-out", metavar="PATH",
                   help="also write every raw result, the machine and the versions to PATH as JSON "
                        "(rewritten after each case), for --from-json")
    p.add_argument("--from-json", metavar="PATH",
                   help="run nothing: print the table from a --json-out file (with --markdown, write "
                        "its block into BENCHMARKS.md)")
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
    if args.from_json:
        with open(args.from_json) as f:
            doc = json.load(f)
        if not doc.get("complete", True):
            print(f"# {args.from_json}: an unfinished run ({len(doc['rows'])} case(s) done)", file=sys.stderr)
        print(f"# {doc['command']}\n# {doc['machine']}")
        return show(doc, args.markdown)

    cuda = args.device == "cuda"
    SD_RS = os.path.abspath(args.sd_rs)
    timeout = args.timeout or (300 if cuda else 1800)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {CASES}")
    if not os.access(SD_RS, os.X_OK):
        sys.exit(f"{SD_RS} is missing: run `cargo build --release` first"
                 + (" (with --features cuda), or pass the CUDA build with --sd-rs" if cuda else ""))
    for d in {plan(args)[n]["model"] for n in names}:
        if not os.path.isfile(os.path.join(d, "BUILT.json")):
            sys.exit(f"{d} is missing: run `scripts/.venv/bin/python scripts/make_bench_models.py` first")

    cases = plan(args)
    # RAYON_NUM_THREADS sets candle's (and the gemm crate's) thread count; sd-rs's own choice of
    # CANDLE_NUM_THREADS (candle's elementwise-op pool) is left to it.
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    libs = []
    if cuda:
        have = env.get("LD_LIBRARY_PATH", "").split(":")
        libs = [d for d in torch_cuda_libs() if d not in have]
        if libs:
            env["LD_LIBRARY_PATH"] = ":".join(libs + [d for d in have if d])
    python = ("scripts/.venv/bin/python"
              if os.path.abspath(sys.executable).startswith(os.path.join(ROOT, "scripts", ".venv") + os.sep)
              else "python3")
    command = f"{python} scripts/bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()
    where = gpu_machine() if cuda else machine()
    print(f"# {command}\n# {where}\n# load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}",
          flush=True)
    if cuda:
        print(f"# per-process timeout {timeout} s; LD_LIBRARY_PATH += {len(libs)} folder(s) of PyTorch's "
              f"CUDA libraries" + ("" if NVIDIA_SMI else "; nvidia-smi not found: no GPU memory column"),
              flush=True)
    doc = {"command": command, "device": args.device, "dtype": args.dtype, "threads": args.threads,
           "nice": args.nice, "torch_train": args.torch_train, "block": block_name(args),
           "machine": where, "started": started.isoformat(), "load_start": load_start, "rows": [],
           "complete": False}
    if args.json_out:
        doc["versions"] = versions(args.device)

    def save_json(rows, finished, load_end, complete):
        if args.json_out:
            doc.update(rows=rows, finished=finished.isoformat(), load_end=load_end, complete=complete)
            with open(args.json_out + ".tmp", "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(args.json_out + ".tmp", args.json_out)

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
                run = run_child(cmd, env, timeout, args.nice, gpu=cuda)
                run["waited_s"] = waited
                runs[tool].append(run)
                got = fmt_time(run["result"]["median_s"]) if run["result"] else f"FAILED {run['error']}"
                mem = (f"GPU memory {fmt_mb(run['gpu_mb'])}, peak RSS {fmt_mb(run['rss_mb'])}" if cuda
                       else f"peak RSS {fmt_mb(run['rss_mb'])}")
                print(f"{name:>10} {tool:>7}: {got}, {mem} (process "
                      f"{run['wall_s']:.0f} s, other processes {run['others_cores']:.2f} cores, "
                      f"load {run['loadavg'][0]:.2f})", flush=True)
        for tool, tool_runs in runs.items():
            row[tool] = merge_runs(tool_runs)
        rows.append(row)
        save_json(rows, datetime.datetime.now(datetime.timezone.utc), os.getloadavg(), False)
    load_end = os.getloadavg()
    finished = datetime.datetime.now(datetime.timezone.utc)

    last = {"command": command, "rows": rows, "started": started.isoformat(),
            "finished": finished.isoformat(), "load_start": load_start, "load_end": load_end}
    if cuda:
        last.update(device=args.device, dtype=args.dtype)
    with open(LAST_RUN, "w") as f:
        json.dump(last, f, indent=1)
    save_json(rows, finished, load_end, True)
    if args.markdown and "versions" not in doc:
        doc["versions"] = versions(args.device)
    doc.update(rows=rows, finished=finished.isoformat(), load_end=load_end, complete=True)
    show(doc, args.markdown)
    if args.json_out:
        print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
    sys.exit(main())
