//! Times (and, under `perf record`, profiles) one training step and one inference forward of the
//! small default models, so that speed changes can be measured on the same inputs.
//!
//!     cargo run --release --example prof_step -- vae 5        # AutoencoderKL, batch 8, 64x64
//!     cargo run --release --example prof_step -- unet 5       # U-Net, batch 32, 4x16x16 latents
//!     cargo run --release --example prof_step -- unet 5 fused # only the fused kernels
//!     cargo run --release --example prof_step -- accuracy     # f32 (both paths) vs f64
//!
//! By default ("ab") every iteration runs candle's composed ops and then the fused CPU kernels
//! of `sd_rs::model::ops` on the same model and inputs, so that both see the same machine load;
//! the first iteration also prints how far their losses and gradients differ.
//!
//! For a profile with symbols, in a separate target dir:
//!
//!     CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
//!         cargo build --release --example prof_step --target-dir target/prof
//!     perf record -F 500 target/prof/release/examples/prof_step unet 3 fused
//!     perf report --no-children --sort symbol,srcline
//!
//! (The build has no frame pointers: for call graphs use `perf record --call-graph dwarf,32768`
//! at a low frequency.) The first iteration warms up allocators and thread pools; the summary
//! is the median of the rest. The models come from configs/sd-rs-anime/{vae,unet}.toml with
//! random weights; each run prints the load average, which on a shared 2-core machine moves the
//! numbers more than anything else.

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sd_rs::model::ops;
use sd_rs::model::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use sd_rs::model::vae::{AutoencoderKL, AutoencoderKLConfig};
use std::collections::HashMap;
use std::time::Instant;

fn load_toml(path: &str) -> Result<toml::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(toml::from_str(&text)?)
}

/// The trained variables as plain tensors: a model built from these records no graph, like one
/// loaded from a checkpoint for inference.
fn frozen(vm: &VarMap, dev: &Device) -> Result<VarBuilder<'static>> {
    let tensors: HashMap<String, Tensor> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    Ok(VarBuilder::from_tensors(tensors, DType::F32, dev))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Which implementation a run uses: candle's composed ops or the fused CPU kernels.
const MODES: [(&str, bool); 2] = [("composed", false), ("fused", true)];

/// Per mode, per named phase, the seconds of each iteration.
struct Timings {
    names: Vec<&'static str>,
    rows: Vec<Vec<Vec<f64>>>,
}

impl Timings {
    fn new(names: &[&'static str]) -> Self {
        Self {
            names: names.to_vec(),
            rows: vec![vec![Vec::new(); names.len()]; MODES.len()],
        }
    }
    fn push(&mut self, mode: usize, values: &[f64]) {
        let line: Vec<String> = self
            .names
            .iter()
            .zip(values)
            .map(|(n, v)| format!("{n} {v:.3}s"))
            .collect();
        println!("  {:>8}: {}", MODES[mode].0, line.join("  "));
        for (row, v) in self.rows[mode].iter_mut().zip(values) {
            row.push(*v);
        }
    }
    fn summary(&self, what: &str) {
        for (mode, rows) in self.rows.iter().enumerate() {
            if rows[0].is_empty() {
                continue;
            }
            let skip = usize::from(rows[0].len() > 1);
            let line: Vec<String> = self
                .names
                .iter()
                .zip(rows)
                .map(|(n, r)| format!("{n} {:.3}s", median(r[skip..].to_vec())))
                .collect();
            println!(
                "{what} [{}] median (after warm-up): {}",
                MODES[mode].0,
                line.join("  ")
            );
        }
    }
}

/// The modes to run: both (interleaved, for an A/B under the same load) or one.
fn selected_modes(which: &str) -> Result<Vec<usize>> {
    match which {
        "ab" => Ok(vec![0, 1]),
        "composed" => Ok(vec![0]),
        "fused" => Ok(vec![1]),
        other => anyhow::bail!("unknown mode {other:?} (ab, composed, fused)"),
    }
}

/// Largest absolute difference between the gradients of two runs, relative to the largest
/// gradient, over all variables.
fn grad_diff(vm: &VarMap, a: &GradStore, b: &GradStore) -> Result<f64> {
    let (mut diff, mut scale) = (0f64, 0f64);
    for var in vm.all_vars() {
        let (Some(ga), Some(gb)) = (a.get(var.as_tensor()), b.get(var.as_tensor())) else {
            anyhow::bail!("a variable has no gradient");
        };
        let d = (ga - gb)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let m = ga.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        diff = diff.max(d as f64);
        scale = scale.max(m as f64);
    }
    Ok(diff / scale.max(1e-30))
}

fn vae(iters: usize, modes: &[usize], dev: &Device) -> Result<()> {
    let cfg = load_toml("configs/sd-rs-anime/vae.toml")?;
    let vcfg: AutoencoderKLConfig = cfg["vae"].clone().try_into()?;
    let vm = VarMap::new();
    let vae = AutoencoderKL::new(VarBuilder::from_varmap(&vm, DType::F32, dev), &vcfg)?;
    let vae_inf = AutoencoderKL::new(frozen(&vm, dev)?, &vcfg)?;
    let x = Tensor::randn(0f32, 1.0, (8, 3, 64, 64), dev)?;
    let noise = Tensor::randn(0f32, 1.0, (8, 4, 16, 16), dev)?;

    println!("vae train step (batch 8, 64x64): encode, decode, loss, backward");
    let mut t = Timings::new(&["enc", "dec", "bwd", "step"]);
    for it in 0..iters {
        let mut results = Vec::new();
        for &mode in modes {
            ops::set_enabled(MODES[mode].1);
            let t0 = Instant::now();
            let post = vae.encode(&x)?;
            let z = post.sample(&noise)?;
            let kl = post.kl()?.mean_all()?;
            z.sum_all()?.to_scalar::<f32>()?;
            let enc = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let y = vae.decode(&z)?;
            let loss = ((y - &x)?.abs()?.mean_all()? + (kl * 1e-6)?)?;
            let loss_value = loss.to_scalar::<f32>()?;
            let dec = t1.elapsed().as_secs_f64();
            let t2 = Instant::now();
            let grads = loss.backward()?;
            let bwd = t2.elapsed().as_secs_f64();
            t.push(mode, &[enc, dec, bwd, t0.elapsed().as_secs_f64()]);
            results.push((loss_value, grads));
        }
        if it == 0 && results.len() == 2 {
            println!(
                "  loss composed {:.7} fused {:.7}; max |grad diff| / max |grad| = {:.2e}",
                results[0].0,
                results[1].0,
                grad_diff(&vm, &results[0].1, &results[1].1)?
            );
        }
    }
    t.summary("vae train");

    println!("vae inference (batch 8): encode (mode), decode");
    let mut t = Timings::new(&["enc", "dec"]);
    for _ in 0..iters {
        for &mode in modes {
            ops::set_enabled(MODES[mode].1);
            let t0 = Instant::now();
            let z = vae_inf.encode(&x)?.mode().clone();
            z.sum_all()?.to_scalar::<f32>()?;
            let enc = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            vae_inf.decode(&z)?.sum_all()?.to_scalar::<f32>()?;
            t.push(mode, &[enc, t1.elapsed().as_secs_f64()]);
        }
    }
    t.summary("vae inference");
    Ok(())
}

fn unet(iters: usize, modes: &[usize], dev: &Device) -> Result<()> {
    let cfg = load_toml("configs/sd-rs-anime/unet.toml")?;
    let ucfg: UNet2DConditionConfig = cfg["model"]["unet"].clone().try_into()?;
    let vm = VarMap::new();
    let unet = UNet2DConditionModel::new(VarBuilder::from_varmap(&vm, DType::F32, dev), &ucfg)?;
    let unet_inf = UNet2DConditionModel::new(frozen(&vm, dev)?, &ucfg)?;
    let (b, ctx_len, ctx_dim) = (32, 32, 128);
    let x = Tensor::randn(0f32, 1.0, (b, 4, 16, 16), dev)?;
    let target = Tensor::randn(0f32, 1.0, (b, 4, 16, 16), dev)?;
    let ctx = Tensor::randn(0f32, 1.0, (b, ctx_len, ctx_dim), dev)?;
    let ts: Vec<f32> = (0..b).map(|i| (i * 31 % 1000) as f32).collect();
    let ts = Tensor::new(ts, dev)?;

    println!("unet train step (batch {b}, 4x16x16, context {ctx_len}x{ctx_dim}): fwd, bwd");
    let mut t = Timings::new(&["fwd", "bwd", "step"]);
    for it in 0..iters {
        let mut results = Vec::new();
        for &mode in modes {
            ops::set_enabled(MODES[mode].1);
            let t0 = Instant::now();
            let pred = unet.forward(&x, &ts, &ctx, None)?;
            let loss = (pred - &target)?.sqr()?.mean_all()?;
            let loss_value = loss.to_scalar::<f32>()?;
            let fwd = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let bwd = t1.elapsed().as_secs_f64();
            t.push(mode, &[fwd, bwd, t0.elapsed().as_secs_f64()]);
            results.push((loss_value, grads));
        }
        if it == 0 && results.len() == 2 {
            println!(
                "  loss composed {:.7} fused {:.7}; max |grad diff| / max |grad| = {:.2e}",
                results[0].0,
                results[1].0,
                grad_diff(&vm, &results[0].1, &results[1].1)?
            );
        }
    }
    t.summary("unet train");

    println!("unet inference forward (batch {b})");
    let mut t = Timings::new(&["fwd"]);
    for _ in 0..iters {
        for &mode in modes {
            ops::set_enabled(MODES[mode].1);
            let t0 = Instant::now();
            unet_inf
                .forward(&x, &ts, &ctx, None)?
                .sum_all()?
                .to_scalar::<f32>()?;
            t.push(mode, &[t0.elapsed().as_secs_f64()]);
        }
    }
    t.summary("unet inference");
    Ok(())
}

/// A copy of `vm` in f64 under the same names (for a float64 reference of the same model).
fn to_f64_varmap(vm: &VarMap, vm64: &VarMap) -> Result<()> {
    let dst = vm64.data().lock().unwrap();
    for (name, var) in vm.data().lock().unwrap().iter() {
        let target = dst.get(name).context("f64 model lacks a variable")?;
        target.set(&var.as_tensor().to_dtype(DType::F64)?)?;
    }
    Ok(())
}

/// Max over variables of max |g - g64| / max |g64|, comparing an f32 run with the f64 one;
/// variables whose f64 gradient is below 1e-3 of the largest count against that floor.
fn grad_error(vm: &VarMap, vm64: &VarMap, g: &GradStore, g64: &GradStore) -> Result<f64> {
    let vars64 = vm64.data().lock().unwrap().clone();
    let mut rows = Vec::new();
    for (name, var) in vm.data().lock().unwrap().iter() {
        let a = g.get(var.as_tensor()).context("missing gradient")?;
        let b = g64
            .get(vars64[name].as_tensor())
            .context("missing f64 gradient")?;
        let a = a.to_dtype(DType::F64)?;
        let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        let m = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        rows.push((d, m));
    }
    let floor = 1e-3 * rows.iter().map(|r| r.1).fold(0f64, f64::max);
    Ok(rows
        .iter()
        .map(|(d, m)| d / m.max(floor))
        .fold(0f64, f64::max))
}

/// How far the f32 composed and f32 fused losses and gradients are from an f64 run of the same
/// model and inputs (the f64 fused kernels match the composed f64 ops to ~1e-12).
fn accuracy(dev: &Device) -> Result<()> {
    let vcfg: AutoencoderKLConfig = load_toml("configs/sd-rs-anime/vae.toml")?["vae"]
        .clone()
        .try_into()?;
    let (vm, vm64) = (VarMap::new(), VarMap::new());
    let vae = AutoencoderKL::new(VarBuilder::from_varmap(&vm, DType::F32, dev), &vcfg)?;
    let vae64 = AutoencoderKL::new(VarBuilder::from_varmap(&vm64, DType::F64, dev), &vcfg)?;
    to_f64_varmap(&vm, &vm64)?;
    let x = Tensor::randn(0f32, 1.0, (8, 3, 64, 64), dev)?;
    let noise = Tensor::randn(0f32, 1.0, (8, 4, 16, 16), dev)?;
    let vae_step = |vae: &AutoencoderKL, dtype: DType| -> Result<(f64, GradStore)> {
        let (x, noise) = (x.to_dtype(dtype)?, noise.to_dtype(dtype)?);
        let post = vae.encode(&x)?;
        let y = vae.decode(&post.sample(&noise)?)?;
        // The training loss (L1 + KL) and, without L1's kinks, a squared error.
        let loss = ((y - &x)?.sqr()?.mean_all()? + (post.kl()?.mean_all()? * 1e-6)?)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((value, loss.backward()?))
    };
    ops::set_enabled(true);
    let (l64, g64) = vae_step(&vae64, DType::F64)?;
    for (name, on) in MODES {
        ops::set_enabled(on);
        let (l, g) = vae_step(&vae, DType::F32)?;
        println!(
            "vae  f32 {name:>8} vs f64: loss rel err {:.2e}, worst grad err (max|diff|/max|g|) {:.2e}",
            (l - l64).abs() / l64.abs(),
            grad_error(&vm, &vm64, &g, &g64)?
        );
    }

    let ucfg: UNet2DConditionConfig = load_toml("configs/sd-rs-anime/unet.toml")?["model"]["unet"]
        .clone()
        .try_into()?;
    let (vm, vm64) = (VarMap::new(), VarMap::new());
    let unet = UNet2DConditionModel::new(VarBuilder::from_varmap(&vm, DType::F32, dev), &ucfg)?;
    let unet64 = UNet2DConditionModel::new(VarBuilder::from_varmap(&vm64, DType::F64, dev), &ucfg)?;
    to_f64_varmap(&vm, &vm64)?;
    let b = 8;
    let x = Tensor::randn(0f32, 1.0, (b, 4, 16, 16), dev)?;
    let target = Tensor::randn(0f32, 1.0, (b, 4, 16, 16), dev)?;
    let ctx = Tensor::randn(0f32, 1.0, (b, 32, 128), dev)?;
    let ts = Tensor::new(
        (0..b).map(|i| (i * 131 % 1000) as f32).collect::<Vec<_>>(),
        dev,
    )?;
    let unet_step = |unet: &UNet2DConditionModel, dtype: DType| -> Result<(f64, GradStore)> {
        let pred = unet.forward(&x.to_dtype(dtype)?, &ts, &ctx.to_dtype(dtype)?, None)?;
        let loss = (pred - target.to_dtype(dtype)?)?.sqr()?.mean_all()?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((value, loss.backward()?))
    };
    ops::set_enabled(true);
    let (l64, g64) = unet_step(&unet64, DType::F64)?;
    for (name, on) in MODES {
        ops::set_enabled(on);
        let (l, g) = unet_step(&unet, DType::F32)?;
        println!(
            "unet f32 {name:>8} vs f64: loss rel err {:.2e}, worst grad err (max|diff|/max|g|) {:.2e}",
            (l - l64).abs() / l64.abs(),
            grad_error(&vm, &vm64, &g, &g64)?
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let what = args.get(1).map(String::as_str).unwrap_or("all");
    let iters: usize = match args.get(2) {
        Some(n) => n.parse().context("iterations")?,
        None => 4,
    };
    let modes = selected_modes(args.get(3).map(String::as_str).unwrap_or("ab"))?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at start: {} (rayon threads: {}, candle threads: {})",
        load.trim(),
        rayon::current_num_threads(),
        candle_core::utils::get_num_threads()
    );
    let dev = Device::Cpu;
    match what {
        "vae" => vae(iters, &modes, &dev)?,
        "unet" => unet(iters, &modes, &dev)?,
        "all" => {
            vae(iters, &modes, &dev)?;
            unet(iters, &modes, &dev)?;
        }
        "accuracy" => accuracy(&dev)?,
        other => anyhow::bail!("unknown model {other:?} (vae, unet, all, accuracy)"),
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at end: {}", load.trim());
    Ok(())
}
