//! The parts of the training loop, each against torch/diffusers numbers or plain math:
//! AdamW, clipping, accumulation, EMA, learning-rate schedules, checkpoints (including a crash
//! mid-write), data loading and sampling, the latent cache and the metrics log.
// Reference numbers are pasted as torch printed them, digits beyond f32 included.
#![allow(clippy::excessive_precision)]
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sd_rs::io::captions::CaptionedImage;
use sd_rs::train::checkpoint::{CheckpointParts, Checkpoints, RngState, TrainState};
use sd_rs::train::data::{
    drop_tags, image_loader, resize_and_crop, rgb_to_tensor, shuffle_tags, BatchConfig, Batcher,
    CropMode, DataPosition, EpochSampler, ImageTransform, Loader,
};
use sd_rs::train::ema::{Ema, EmaConfig, EmaWarmup};
use sd_rs::train::latent_cache::{file_identity, sample_latent, CacheSettings, LatentCache};
use sd_rs::train::lr::{LrSchedule, LrScheduleKind};
use sd_rs::train::metrics::{check_finite, read_metrics, MetricsLog, MetricsRecord, SmoothedLoss};
use sd_rs::train::optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, ParamGrads};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdrs-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(actual: &[f32], expected: &[f32], tol: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths");
    let max = actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0f32, f32::max);
    let head = |v: &[f32]| v.iter().take(8).copied().collect::<Vec<_>>();
    assert!(
        max <= tol,
        "{what}: max abs diff {max} > {tol}\n{:?}..\n{:?}..",
        head(actual),
        head(expected)
    );
}

// ---------------------------------------------------------------------------------------------
// AdamW

/// Two parameters w (2x3) and b (3) with the loss of `adamw_torch_reference`.
fn adamw_problem() -> (Var, Var) {
    let w = Tensor::new(&[[0.5f32, -1.0, 2.0], [1.5, 0.25, -0.75]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[0.1f32, -0.2, 0.3], &Device::Cpu).unwrap();
    (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap())
}

fn adamw_loss(w: &Var, b: &Var) -> Result<Tensor> {
    let dev = &Device::Cpu;
    let a = Tensor::new(&[[1.0f32, 2.0, -1.0], [0.5, -3.0, 1.0]], dev)?;
    let t = Tensor::new(&[[0.0f32, 1.0, 0.5], [-1.0, 0.0, 2.0]], dev)?;
    let c = Tensor::new(&[1.0f32, -2.0, 0.5], dev)?;
    let fit = (w.as_tensor() * a)?.sub(&t)?.sqr()?.sum_all()?;
    let reg = (b.as_tensor().sqr()? * c)?.sum_all()?;
    Ok((fit + reg)?)
}

/// torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05), three steps at
/// lr 0.1, 0.05, 0.02 on loss = sum((w*a - t)^2) + sum(b^2 c). Made with torch 2.15:
/// ```python
/// w = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], requires_grad=True)
/// b = torch.tensor([0.1, -0.2, 0.3], requires_grad=True)
/// a = torch.tensor([[1.0, 2.0, -1.0], [0.5, -3.0, 1.0]])
/// t = torch.tensor([[0.0, 1.0, 0.5], [-1.0, 0.0, 2.0]])
/// c = torch.tensor([1.0, -2.0, 0.5])
/// groups = [{"params": [w]}, {"params": [b]}] if bias_decay else \
///          [{"params": [w]}, {"params": [b], "weight_decay": 0.0}]
/// opt = torch.optim.AdamW(groups, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
/// for lr in [0.1, 0.05, 0.02]:
///     for g in opt.param_groups: g["lr"] = lr
///     opt.zero_grad()
///     loss = ((w * a - t) ** 2).sum() + (b * b * c).sum()
///     loss.backward(); opt.step()
/// ```
const TORCH_W: [f32; 6] = [
    3.272603452e-01,
    -8.221449852e-01,
    1.813566089e+00,
    1.317762852e+00,
    8.230672777e-02,
    -5.741451383e-01,
];
const TORCH_B_NO_DECAY: [f32; 3] = [-3.926210105e-02, -3.694309890e-01, 1.327012181e-01];
const TORCH_B_DECAY: [f32; 3] = [-3.944264725e-02, -3.673512340e-01, 1.306337416e-01];

#[test]
fn adamw_matches_torch() -> Result<()> {
    for (no_decay_1d, expected_b) in [(true, TORCH_B_NO_DECAY), (false, TORCH_B_DECAY)] {
        let (w, b) = adamw_problem();
        let config = AdamWConfig {
            weight_decay: 0.05,
            no_decay_for_biases_and_norms: no_decay_1d,
            ..Default::default()
        };
        let mut opt = AdamW::new(
            vec![("w".into(), w.clone()), ("b".into(), b.clone())],
            config,
        )?;
        for lr in [0.1, 0.05, 0.02] {
            let grads = opt.grads(&adamw_loss(&w, &b)?.backward()?);
            assert!(opt.without_grad(&grads).is_empty());
            opt.step(&grads, lr)?;
        }
        assert_eq!(opt.step_count(), 3);
        assert_close(&values(&w), &TORCH_W, 1e-6, "w");
        assert_close(&values(&b), &expected_b, 1e-6, "b");
    }
    Ok(())
}

#[test]
fn adamw_state_round_trip_continues_identically() -> Result<()> {
    let dir = scratch("adamw-state");
    let (w, b) = adamw_problem();
    let mut opt = AdamW::new(
        vec![("w".into(), w.clone()), ("b".into(), b.clone())],
        Default::default(),
    )?;
    for _ in 0..2 {
        let grads = opt.grads(&adamw_loss(&w, &b)?.backward()?);
        opt.step(&grads, 0.05)?;
    }
    opt.save(&dir.join("optimizer.safetensors"))?;
    // A second optimizer on copies of the weights, restored from the file.
    let (w2, b2) = (
        Var::from_tensor(&w.as_tensor().copy()?)?,
        Var::from_tensor(&b.as_tensor().copy()?)?,
    );
    let mut resumed = AdamW::new(
        vec![("w".into(), w2.clone()), ("b".into(), b2.clone())],
        Default::default(),
    )?;
    resumed.load(&dir.join("optimizer.safetensors"))?;
    assert_eq!(resumed.step_count(), 2);
    for _ in 0..3 {
        let grads = opt.grads(&adamw_loss(&w, &b)?.backward()?);
        opt.step(&grads, 0.05)?;
        let grads = resumed.grads(&adamw_loss(&w2, &b2)?.backward()?);
        resumed.step(&grads, 0.05)?;
    }
    assert_eq!(values(&w), values(&w2), "bitwise identical continuation");
    assert_eq!(values(&b), values(&b2));
    // A fresh optimizer would not have continued the same way: the state mattered.
    let (w3, b3) = (
        Var::from_tensor(&w2.as_tensor().copy()?)?,
        Var::from_tensor(&b2.as_tensor().copy()?)?,
    );
    let mut fresh = AdamW::new(
        vec![("w".into(), w3.clone()), ("b".into(), b3.clone())],
        Default::default(),
    )?;
    let grads = fresh.grads(&adamw_loss(&w3, &b3)?.backward()?);
    fresh.step(&grads, 0.05)?;
    let grads = resumed.grads(&adamw_loss(&w2, &b2)?.backward()?);
    resumed.step(&grads, 0.05)?;
    assert_ne!(values(&w2), values(&w3));
    // State for a different model is refused.
    let other = Var::from_tensor(&Tensor::zeros(4, DType::F32, &Device::Cpu)?)?;
    let mut wrong = AdamW::new(vec![("w".into(), other)], Default::default())?;
    let err = wrong
        .load(&dir.join("optimizer.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("m.w has shape"), "{err}");
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn clip_grad_norm_as_torch() -> Result<()> {
    let dev = &Device::Cpu;
    let make = || -> Result<ParamGrads> {
        Ok(ParamGrads(vec![
            Some(Tensor::new(&[3.0f32, -4.0], dev)?),
            None,
            Some(Tensor::new(&[[12.0f32]], dev)?),
        ]))
    };
    // torch.nn.utils.clip_grad_norm_([p1, p2], 6.5) on grads [3, -4] and [[12]]: returns 13.0 and
    // leaves [1.499999881, -1.999999881] and [[5.999999523]].
    let mut grads = make()?;
    let norm = clip_grad_norm(&mut grads, 6.5)?;
    assert_eq!(norm, 13.0);
    assert_close(
        &values(grads.0[0].as_ref().unwrap()),
        &[1.499999881, -1.999999881],
        1e-7,
        "g1",
    );
    assert_close(
        &values(grads.0[2].as_ref().unwrap()),
        &[5.999999523],
        1e-6,
        "g2",
    );
    // Within bounds: untouched.
    let mut grads = make()?;
    assert_eq!(clip_grad_norm(&mut grads, 100.0)?, 13.0);
    assert_eq!(values(grads.0[0].as_ref().unwrap()), vec![3.0, -4.0]);
    Ok(())
}

#[test]
fn accumulated_gradient_equals_full_batch_gradient() -> Result<()> {
    let dev = &Device::Cpu;
    let w = Var::from_tensor(&Tensor::new(&[0.3f32, -0.7], dev)?)?;
    let x = Tensor::new(&[[1.0f32, 2.0], [0.5, -1.0], [-2.0, 0.25], [3.0, 1.5]], dev)?;
    let y = Tensor::new(&[1.0f32, 0.0, -1.0, 2.0], dev)?;
    let opt = AdamW::new(vec![("w".into(), w.clone())], Default::default())?;
    // Mean squared error of a linear model over rows `rows` of the batch.
    let loss = |rows: std::ops::Range<usize>| -> Result<Tensor> {
        let n = rows.len();
        let xs = x.narrow(0, rows.start, n)?;
        let pred = xs.matmul(&w.as_tensor().unsqueeze(1)?)?.squeeze(1)?;
        Ok((pred - y.narrow(0, rows.start, n)?)?.sqr()?.mean_all()?)
    };
    let full = opt.grads(&loss(0..4)?.backward()?);
    let mut acc = GradAccumulator::new();
    acc.add(opt.grads(&loss(0..2)?.backward()?))?;
    acc.add(opt.grads(&loss(2..4)?.backward()?))?;
    assert_eq!(acc.count(), 2);
    let mean = acc.finish()?;
    assert_eq!(acc.count(), 0);
    let expected = values(full.0[0].as_ref().unwrap());
    assert_close(
        &values(mean.0[0].as_ref().unwrap()),
        &expected,
        1e-6,
        "accumulated",
    );
    assert!(acc.finish().is_err(), "nothing accumulated");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// EMA

#[test]
fn ema_matches_diffusers() -> Result<()> {
    // diffusers.training_utils.EMAModel([p], **kwargs), p set to [k, k^2 - 2, 4/k] before the
    // k-th ema.step (k = 1..6); the decays (ema.cur_decay_value) and final shadow params:
    let cases = [
        (
            EmaConfig {
                max_decay: 0.9,
                ..Default::default()
            },
            [
                0.0,
                1.818181818182e-01,
                2.5e-01,
                3.076923076923e-01,
                3.571428571429e-01,
                4.0e-01,
            ],
            [5.400199890e+00f32, 2.794565582e+01, 7.745454907e-01],
        ),
        (
            EmaConfig {
                max_decay: 0.9999,
                warmup: EmaWarmup::Power {
                    inv_gamma: 1.0,
                    power: 2.0 / 3.0,
                },
                ..Default::default()
            },
            [
                0.0,
                3.700394750526e-01,
                5.192501432309e-01,
                6.031497370080e-01,
                6.580048106647e-01,
                6.971465678613e-01,
            ],
            [4.370618820e+00, 1.938827515e+01, 1.145693421e+00],
        ),
        (
            EmaConfig {
                max_decay: 0.5,
                update_after_step: 2,
                ..Default::default()
            },
            [
                0.0,
                0.0,
                0.0,
                1.818181818182e-01,
                2.5e-01,
                3.076923076923e-01,
            ],
            [5.601398468e+00, 2.982517624e+01, 7.277389765e-01],
        ),
    ];
    for (config, decays, shadow) in cases {
        let p = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 4.0], &Device::Cpu)?)?;
        let vars = vec![("p".to_string(), p.clone())];
        let mut ema = Ema::new(&vars, config.clone())?;
        for (k, expected) in (1..=6).zip(decays) {
            let k = k as f32;
            p.set(&Tensor::new(&[k, k * k - 2.0, 4.0 / k], &Device::Cpu)?)?;
            let decay = ema.update(&vars)?;
            assert!(
                (decay - expected).abs() < 1e-12,
                "{config:?} step {k}: {decay} vs {expected}"
            );
        }
        assert_close(
            &values(&ema.weights(DType::F32)?["p"]),
            &shadow,
            2e-6,
            "shadow",
        );
    }
    // A constant decay still copies on the first update.
    let none = EmaConfig {
        max_decay: 0.75,
        warmup: EmaWarmup::None,
        ..Default::default()
    };
    assert_eq!(
        (none.decay(1), none.decay(2), none.decay(100)),
        (0.0, 0.75, 0.75)
    );
    Ok(())
}

#[test]
fn ema_save_load_and_apply() -> Result<()> {
    let dir = scratch("ema");
    let varmap = VarMap::new();
    let init = candle_nn::Init::Const(1.0);
    varmap.get((2, 2), "conv.weight", init, DType::F32, &Device::Cpu)?;
    varmap.get(
        2,
        "conv.bias",
        candle_nn::Init::Const(0.5),
        DType::F32,
        &Device::Cpu,
    )?;
    let vars = sd_rs::train::optim::named_vars(&varmap, "");
    let config = EmaConfig {
        max_decay: 0.5,
        warmup: EmaWarmup::None,
        ..Default::default()
    };
    let mut ema = Ema::new(&vars, config.clone())?;
    ema.update(&vars)?; // copies: 1.0
    varmap.data().lock().unwrap()["conv.weight"].set(&Tensor::full(3f32, (2, 2), &Device::Cpu)?)?;
    ema.update(&vars)?; // 0.5 * 1 + 0.5 * 3 = 2
    assert_eq!(
        values(&ema.weights(DType::F32)?["conv.weight"]),
        vec![2.0; 4]
    );
    ema.save(&dir.join("ema.safetensors"))?;

    let mut restored = Ema::new(&vars, config)?;
    restored.load(&dir.join("ema.safetensors"))?;
    assert_eq!(restored.optimization_step(), 2);
    assert_eq!(
        values(&restored.weights(DType::F32)?["conv.weight"]),
        vec![2.0; 4]
    );
    // The EMA file is a plain weights file with the model's names.
    let plain = candle_core::safetensors::load(dir.join("ema.safetensors"), &Device::Cpu)?;
    assert_eq!(plain.len(), 2);
    // A copy in a new VarMap leaves the training weights alone; copy_to overwrites them.
    let copy = restored.to_varmap(DType::F32)?;
    assert_eq!(
        values(copy.data().lock().unwrap()["conv.weight"].as_tensor()),
        vec![2.0; 4]
    );
    assert_eq!(
        values(varmap.data().lock().unwrap()["conv.weight"].as_tensor()),
        vec![3.0; 4]
    );
    restored.copy_to(&varmap)?;
    assert_eq!(
        values(varmap.data().lock().unwrap()["conv.weight"].as_tensor()),
        vec![2.0; 4]
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Learning rate

#[test]
fn lr_schedules_match_diffusers() {
    // diffusers.optimization.get_scheduler(name, SGD(lr=1e-3), num_warmup_steps=3,
    // num_training_steps=10), the lr before each of 11 steps; "cosine_min" is transformers'
    // get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=0.1).
    let cases: [(LrScheduleKind, f64, [f64; 11]); 5] = [
        (LrScheduleKind::Constant, 0.0, [1e-3; 11]),
        (
            LrScheduleKind::ConstantWithWarmup,
            0.0,
            [
                0.0,
                3.333333333333e-04,
                6.666666666667e-04,
                1e-3,
                1e-3,
                1e-3,
                1e-3,
                1e-3,
                1e-3,
                1e-3,
                1e-3,
            ],
        ),
        (
            LrScheduleKind::Cosine,
            0.0,
            [
                0.0,
                3.333333333333e-04,
                6.666666666667e-04,
                1.0e-03,
                9.504844339512e-04,
                8.117449009294e-04,
                6.112604669782e-04,
                3.887395330218e-04,
                1.882550990706e-04,
                4.951556604879e-05,
                0.0,
            ],
        ),
        (
            LrScheduleKind::Linear,
            0.0,
            [
                0.0,
                3.333333333333e-04,
                6.666666666667e-04,
                1.0e-03,
                8.571428571429e-04,
                7.142857142857e-04,
                5.714285714286e-04,
                4.285714285714e-04,
                2.857142857143e-04,
                1.428571428571e-04,
                0.0,
            ],
        ),
        (
            LrScheduleKind::Cosine,
            0.1,
            [
                0.0,
                3.333333333333e-04,
                6.666666666667e-04,
                1.0e-03,
                9.554359905561e-04,
                8.305704108364e-04,
                6.501344202803e-04,
                4.498655797197e-04,
                2.694295891636e-04,
                1.445640094439e-04,
                1.0e-04,
            ],
        ),
    ];
    for (kind, min_lr_ratio, expected) in cases {
        let schedule = LrSchedule {
            kind,
            base_lr: 1e-3,
            warmup_steps: 3,
            total_steps: 10,
            min_lr_ratio,
        };
        for (step, want) in expected.iter().enumerate() {
            let got = schedule.lr(step as u64);
            assert!(
                (got - want).abs() < 1e-15,
                "{kind:?} min {min_lr_ratio} step {step}: {got} vs {want}"
            );
        }
        // Past the end the rate stays at its final value.
        assert!(
            (schedule.lr(25) - expected[10]).abs() < 1e-15,
            "{kind:?} past the end"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

fn model_varmap(value: f32) -> Result<VarMap> {
    let varmap = VarMap::new();
    varmap.get(
        (2, 3),
        "down.weight",
        candle_nn::Init::Const(value as f64),
        DType::F32,
        &Device::Cpu,
    )?;
    varmap.get(
        3,
        "down.bias",
        candle_nn::Init::Const(-(value as f64)),
        DType::F32,
        &Device::Cpu,
    )?;
    Ok(varmap)
}

fn train_state(step: u64, rng: &ChaCha8Rng) -> TrainState {
    TrainState {
        step,
        rng: RngState::capture(rng),
        data: DataPosition {
            epoch: step / 7,
            index: (step % 7) as usize,
        },
        config: serde_json::json!({"learning_rate": 1e-4, "batch_size": 2}),
    }
}

/// One fake training step: move every weight by `delta`, then update the optimizer and EMA.
fn fake_step(varmap: &VarMap, opt: &mut AdamW, ema: &mut Ema) -> Result<()> {
    let vars = sd_rs::train::optim::named_vars(varmap, "");
    let loss = vars
        .iter()
        .map(|(_, v)| v.as_tensor().sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let loss = Tensor::stack(&loss, 0)?.sum_all()?;
    opt.step(&opt.grads(&loss.backward()?), 0.01)?;
    ema.update(&vars)?;
    Ok(())
}

#[test]
fn checkpoint_round_trip_resumes_exactly() -> Result<()> {
    let root = scratch("ckpt-roundtrip");
    let checkpoints = Checkpoints::new(&root, 2);
    let varmap = model_varmap(0.5)?;
    let vars = sd_rs::train::optim::named_vars(&varmap, "");
    let mut opt = AdamW::new(vars.clone(), Default::default())?;
    let mut ema = Ema::new(&vars, EmaConfig::default())?;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for step in 1..=3u64 {
        fake_step(&varmap, &mut opt, &mut ema)?;
        rng.next_u32(); // an odd number of 32-bit words: the position must be exact
        let parts = CheckpointParts {
            weights: vec![("unet", &varmap)],
            optimizer: &opt,
            ema: Some(&ema),
        };
        checkpoints.save(&train_state(step, &rng), &parts)?;
    }
    // keep_last = 2: step 1 is gone.
    let steps: Vec<u64> = checkpoints.list()?.into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![2, 3]);

    // Resume into a fresh model and optimizer.
    let latest = checkpoints.latest()?;
    assert!(latest.rejected.is_empty());
    let ckpt = latest.found.expect("a checkpoint");
    assert_eq!(ckpt.state, train_state(3, &rng));
    let varmap2 = model_varmap(9.0)?;
    let vars2 = sd_rs::train::optim::named_vars(&varmap2, "");
    let mut opt2 = AdamW::new(vars2.clone(), Default::default())?;
    let mut ema2 = Ema::new(&vars2, EmaConfig::default())?;
    ckpt.load_weights("unet", &varmap2)?;
    ckpt.load_optimizer(&mut opt2)?;
    ckpt.load_ema(&mut ema2)?;
    let mut rng2 = ckpt.state.rng.restore()?;
    // Both runs go on identically: weights, EMA and RNG draws.
    for _ in 0..2 {
        fake_step(&varmap, &mut opt, &mut ema)?;
        fake_step(&varmap2, &mut opt2, &mut ema2)?;
        assert_eq!(rng.next_u64(), rng2.next_u64());
    }
    for (name, var) in &vars {
        let var2 = &vars2.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(values(var.as_tensor()), values(var2.as_tensor()), "{name}");
    }
    assert_eq!(
        values(&ema.weights(DType::F32)?["down.weight"]),
        values(&ema2.weights(DType::F32)?["down.weight"])
    );
    // The weights file loads as plain diffusers-named safetensors.
    let plain = candle_core::safetensors::load(ckpt.dir.join("unet.safetensors"), &Device::Cpu)?;
    let mut names: Vec<_> = plain.keys().cloned().collect();
    names.sort();
    assert_eq!(names, vec!["down.bias", "down.weight"]);
    std::fs::remove_dir_all(root)?;
    Ok(())
}

#[test]
fn checkpoint_survives_a_crash_mid_write() -> Result<()> {
    let root = scratch("ckpt-crash");
    let checkpoints = Checkpoints::new(&root, 3);
    let varmap = model_varmap(0.5)?;
    let vars = sd_rs::train::optim::named_vars(&varmap, "");
    let mut opt = AdamW::new(vars.clone(), Default::default())?;
    let mut ema = Ema::new(&vars, EmaConfig::default())?;
    let rng = ChaCha8Rng::seed_from_u64(1);
    fake_step(&varmap, &mut opt, &mut ema)?;
    let parts = CheckpointParts {
        weights: vec![("unet", &varmap)],
        optimizer: &opt,
        ema: None,
    };
    let good = checkpoints.save(&train_state(100, &rng), &parts)?;

    // A save of step 200 killed mid-write: a temporary directory with a torn weights file.
    let torn = root.join(".tmp-checkpoint-200-99999");
    std::fs::create_dir_all(&torn)?;
    std::fs::write(torn.join("unet.safetensors"), b"\x10\x00\x00")?;
    // A newer checkpoint damaged behind our back (a file gone) is passed over, with a reason.
    std::fs::create_dir_all(root.join("checkpoint-300"))?;
    std::fs::copy(
        good.join("state.json"),
        root.join("checkpoint-300/state.json"),
    )?;
    // And one with no state.json at all.
    std::fs::create_dir_all(root.join("checkpoint-400"))?;

    let latest = checkpoints.latest()?;
    let found = latest.found.expect("the good checkpoint");
    assert_eq!(found.dir, good);
    assert_eq!(found.state.step, 100);
    assert!(!found.has_ema());
    assert_eq!(latest.rejected.len(), 2, "{:?}", latest.rejected);
    assert!(
        latest.rejected[0].contains("checkpoint-400"),
        "{}",
        latest.rejected[0]
    );
    assert!(
        latest.rejected[1].contains("checkpoint-300: optimizer.safetensors is missing"),
        "{}",
        latest.rejected[1]
    );

    // The next save sweeps the temporary directory away.
    checkpoints.save(&train_state(101, &rng), &parts)?;
    assert!(!torn.exists());
    assert_eq!(checkpoints.latest()?.found.unwrap().state.step, 101);
    std::fs::remove_dir_all(root)?;
    Ok(())
}

#[test]
fn rng_state_round_trip() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(123);
    rng.set_stream(5);
    for _ in 0..37 {
        rng.next_u32();
    }
    let state = RngState::capture(&rng);
    let json = serde_json::to_string(&state)?;
    let mut restored = serde_json::from_str::<RngState>(&json)?.restore()?;
    for _ in 0..100 {
        assert_eq!(rng.next_u64(), restored.next_u64());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Data

fn test_image(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 37 + y * 11) % 256) as u8,
            ((x * 5 + y * 29) % 256) as u8,
            ((x * y * 7) % 256) as u8,
        ])
    })
}

#[test]
fn resize_and_center_crop_match_pil() -> Result<()> {
    // PIL: Image.fromarray(a).resize((6, 4), Image.BILINEAR), then columns [1, 5) (torchvision's
    // Resize(4) + CenterCrop(4) on the same 10x6 image), as CHW:
    let pil: [u8; 48] = [
        78, 143, 198, 64, 94, 159, 214, 80, 109, 174, 197, 76, 125, 190, 149, 54, 21, 30, 37, 46,
        62, 71, 78, 87, 103, 112, 119, 128, 144, 153, 160, 169, 5, 10, 14, 18, 25, 47, 66, 87, 45,
        85, 118, 158, 65, 121, 170, 191,
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let out = resize_and_crop(&test_image(10, 6), 4, CropMode::Center, &mut rng);
    assert_eq!(out.dimensions(), (4, 4));
    let ours = values(&rgb_to_tensor(&out)?);
    let expected: Vec<f32> = pil.iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
    // Both filters are bilinear; they may round differently by one level (2/255 in [-1, 1]).
    assert_close(
        &ours,
        &expected,
        2.0 / 255.0 + 1e-6,
        "resize + center crop vs PIL",
    );

    // No resize needed: the crop offsets follow Python's round-half-to-even.
    for (w, left) in [(5u32, 0u32), (7, 2), (9, 2), (6, 1)] {
        let image = test_image(w, 4);
        let crop = resize_and_crop(&image, 4, CropMode::Center, &mut rng);
        assert_eq!(crop.get_pixel(0, 0), image.get_pixel(left, 0), "width {w}");
    }
    // Pixel values map to [-1, 1].
    let px = image::RgbImage::from_pixel(1, 1, image::Rgb([0, 255, 51]));
    assert_close(
        &values(&rgb_to_tensor(&px)?),
        &[-1.0, 1.0, -0.6],
        1e-6,
        "normalise",
    );
    Ok(())
}

#[test]
fn random_crop_stays_inside_and_varies() {
    let image = test_image(12, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut lefts = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let crop = resize_and_crop(&image, 4, CropMode::Random, &mut rng);
        let left = (0..=8)
            .find(|&l| image.get_pixel(l, 1) == crop.get_pixel(0, 1))
            .expect("inside");
        lefts.insert(left);
    }
    assert_eq!(lefts.len(), 9, "every offset 0..=8 is drawn: {lefts:?}");
}

#[test]
fn epoch_sampler_permutes_deterministically() {
    let sampler = EpochSampler::new(50, 42);
    let (e0, e1) = (sampler.order(0), sampler.order(1));
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    assert_ne!(e0, e1);
    assert_eq!(e0, EpochSampler::new(50, 42).order(0));
    assert_ne!(e0, EpochSampler::new(50, 43).order(0));
}

/// `n` small PNGs (varied sizes) with captions "caption i", plus the list.
fn image_dataset(dir: &Path, n: usize) -> Vec<CaptionedImage> {
    (0..n)
        .map(|i| {
            let path = dir.join(format!("{i}.png"));
            let image = image::RgbImage::from_fn(8 + i as u32 % 3, 8, |x, y| {
                image::Rgb([
                    (x * 30 + i as u32 * 7) as u8,
                    (y * 30) as u8,
                    (i * 20) as u8,
                ])
            });
            image.save(&path).unwrap();
            CaptionedImage {
                path,
                caption: format!("caption {i}"),
            }
        })
        .collect()
}

fn batch_config(batch_size: usize, caption_dropout: f64, strict: bool) -> BatchConfig {
    BatchConfig {
        caption_dropout,
        ..BatchConfig::plain(batch_size, 11, strict)
    }
}

#[test]
fn batches_resume_from_a_position_exactly() -> Result<()> {
    let dir = scratch("data-resume");
    let items = Arc::new(image_dataset(&dir, 7));
    let transform = ImageTransform {
        resolution: 6,
        crop: CropMode::Random,
        random_flip: true,
    };
    let config = batch_config(3, 0.3, false);
    let mut batcher = Batcher::new(
        items.clone(),
        image_loader(transform.clone()),
        config.clone(),
        DataPosition::default(),
    )?;
    let batches: Vec<_> = (0..6)
        .map(|_| batcher.next_batch())
        .collect::<Result<_>>()?;
    assert_eq!(batches[0].samples.dims(), &[3, 3, 6, 6]);
    // 3 samples a batch over 7 items: batch 2 runs from epoch 0 into epoch 1.
    assert_eq!(batches[1].next, DataPosition { epoch: 0, index: 6 });
    assert_eq!(batches[2].next, DataPosition { epoch: 1, index: 2 });
    // Every epoch uses every item once.
    let first_epoch: Vec<usize> = batches
        .iter()
        .flat_map(|b| b.indices.clone())
        .take(7)
        .collect();
    assert_eq!(first_epoch, EpochSampler::new(7, 11).order(0));

    // Resuming after batch 2 gives batches 3.. again: same items, captions, crops and flips.
    let mut resumed = Batcher::new(
        items.clone(),
        image_loader(transform),
        config,
        batches[2].next,
    )?;
    for expected in &batches[3..] {
        let got = resumed.next_batch()?;
        assert_eq!(got.indices, expected.indices);
        assert_eq!(got.captions, expected.captions);
        assert_eq!(values(&got.samples), values(&expected.samples));
        assert_eq!(got.next, expected.next);
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn caption_dropout_rate() -> Result<()> {
    let dir = scratch("data-dropout");
    let items = Arc::new(image_dataset(&dir, 4));
    // A loader that does no image work, so many samples are cheap.
    let load: sd_rs::train::data::LoadFn =
        Arc::new(|_: &CaptionedImage, i: usize, _: &mut ChaCha8Rng| {
            Ok(Tensor::new(&[i as f32], &Device::Cpu)?)
        });
    for (p, range) in [(0.0, 0..=0), (1.0, 4000..=4000), (0.1, 340..=460)] {
        let mut batcher = Batcher::new(
            items.clone(),
            load.clone(),
            batch_config(100, p, false),
            DataPosition::default(),
        )?;
        let mut dropped = 0;
        for _ in 0..40 {
            let batch = batcher.next_batch()?;
            dropped += batch.captions.iter().filter(|c| c.is_empty()).count();
            // Kept captions belong to their sample.
            for (c, i) in batch.captions.iter().zip(&batch.indices) {
                assert!(c.is_empty() || *c == format!("caption {i}"));
            }
        }
        assert!(
            range.contains(&dropped),
            "p = {p}: {dropped} of 4000 dropped"
        );
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn tag_dropout_keeps_the_leading_tags_and_drops_the_others_at_its_rate() {
    let caption = "anime girl, red hair, long hair,glasses , blue background";
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // Rate 0: the caption as written, spacing included, and no random numbers used.
    assert_eq!(drop_tags(caption, 0.0, 2, &mut rng), caption);
    assert_eq!(drop_tags(caption, 1.0, 2, &mut rng), "anime girl, red hair");
    assert_eq!(
        drop_tags(caption, 1.0, 9, &mut rng),
        "anime girl, red hair, long hair, glasses, blue background"
    );
    let mut dropped = [0usize; 3];
    let trials = 4000;
    for _ in 0..trials {
        let out = drop_tags(caption, 0.25, 2, &mut rng);
        assert!(out.starts_with("anime girl, red hair"), "{out}");
        let tags: Vec<&str> = out.split(", ").collect();
        // Kept tags stay in their order.
        let order = [
            "anime girl",
            "red hair",
            "long hair",
            "glasses",
            "blue background",
        ];
        let positions: Vec<usize> = tags
            .iter()
            .map(|t| order.iter().position(|o| o == t).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{out}");
        for (k, tag) in order[2..].iter().enumerate() {
            dropped[k] += !tags.contains(tag) as usize;
        }
    }
    // Each later tag independently, at 0.25: 1000 of 4000 expected, sd about 27.
    for d in dropped {
        assert!((880..=1120).contains(&d), "{dropped:?} of {trials}");
    }
}

#[test]
fn tag_shuffling_keeps_the_leading_tags_and_draws_every_order_of_the_others_evenly() {
    let caption = "anime girl, red hair,glasses , blue background";
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    // Nothing to shuffle: the tags come back in order, tidied.
    assert_eq!(
        shuffle_tags(caption, 4, &mut rng),
        "anime girl, red hair, glasses, blue background"
    );
    assert_eq!(
        shuffle_tags(caption, 9, &mut rng),
        shuffle_tags(caption, 3, &mut rng)
    );
    let mut orders = std::collections::HashMap::new();
    let trials = 6000;
    for _ in 0..trials {
        let out = shuffle_tags(caption, 1, &mut rng);
        let rest = out.strip_prefix("anime girl, ").expect(&out).to_string();
        let mut tags: Vec<&str> = rest.split(", ").collect();
        tags.sort();
        assert_eq!(tags, ["blue background", "glasses", "red hair"], "{out}");
        *orders.entry(rest).or_insert(0) += 1;
    }
    // The 3! orders, 1000 each expected (sd about 29).
    assert_eq!(orders.len(), 6, "{orders:?}");
    for (order, n) in &orders {
        assert!((880..=1120).contains(n), "{order:?}: {n} of {trials}");
    }
}

/// Batches of `n` images captioned "caption {i}, tag a, tag b", each sample its index.
fn tagged_caption_batcher(dir: &Path, n: usize, config: BatchConfig) -> Result<Batcher> {
    let items: Vec<CaptionedImage> = image_dataset(dir, n)
        .into_iter()
        .map(|mut item| {
            item.caption = format!("{}, tag a, tag b", item.caption);
            item
        })
        .collect();
    let load: sd_rs::train::data::LoadFn =
        Arc::new(|_: &CaptionedImage, i: usize, _: &mut ChaCha8Rng| {
            Ok(Tensor::new(&[i as f32], &Device::Cpu)?)
        });
    Batcher::new(Arc::new(items), load, config, DataPosition::default())
}

#[test]
fn batches_shuffle_their_captions_tags_when_asked() -> Result<()> {
    let dir = scratch("data-shuffle");
    let config = BatchConfig {
        caption_keep_tags: 1,
        caption_shuffle_tags: true,
        ..batch_config(100, 0.0, false)
    };
    let mut batcher = tagged_caption_batcher(&dir, 2, config)?;
    let mut seen = std::collections::HashMap::new();
    for _ in 0..10 {
        let batch = batcher.next_batch()?;
        for (c, i) in batch.captions.iter().zip(&batch.indices) {
            let rest = c.strip_prefix(&format!("caption {i}, ")).expect(c);
            *seen.entry(rest.to_string()).or_insert(0) += 1;
        }
    }
    // Both orders of the two later tags, each about half of 1000.
    assert_eq!(seen.len(), 2, "{seen:?}");
    for order in ["tag a, tag b", "tag b, tag a"] {
        assert!((440..=560).contains(&seen[order]), "{order:?}: {seen:?}");
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn batches_apply_tag_dropout_to_their_captions() -> Result<()> {
    let dir = scratch("data-tags");
    let config = BatchConfig {
        caption_tag_dropout: 0.5,
        caption_keep_tags: 1,
        ..batch_config(100, 0.0, false)
    };
    let mut batcher = tagged_caption_batcher(&dir, 4, config)?;
    let mut seen = std::collections::HashMap::new();
    for _ in 0..10 {
        let batch = batcher.next_batch()?;
        for (c, i) in batch.captions.iter().zip(&batch.indices) {
            assert!(c.starts_with(&format!("caption {i}")), "{c}");
            *seen
                .entry(c.trim_start_matches(&format!("caption {i}")).to_string())
                .or_insert(0) += 1;
        }
    }
    // All four subsets of the two later tags, each about a quarter of 1000.
    assert_eq!(seen.len(), 4, "{seen:?}");
    for suffix in ["", ", tag a", ", tag b", ", tag a, tag b"] {
        let n = seen[suffix];
        assert!((200..=300).contains(&n), "{suffix:?}: {n} of 1000");
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn unreadable_images_are_skipped_and_reported_or_fatal_when_strict() -> Result<()> {
    let dir = scratch("data-bad");
    let mut items = image_dataset(&dir, 4);
    let bad = dir.join("broken.png");
    std::fs::write(&bad, b"\x89PNG but not really")?;
    items.push(CaptionedImage {
        path: bad.clone(),
        caption: "broken".into(),
    });
    let items = Arc::new(items);
    let transform = ImageTransform {
        resolution: 8,
        crop: CropMode::Center,
        random_flip: false,
    };

    let mut batcher = Batcher::new(
        items.clone(),
        image_loader(transform.clone()),
        batch_config(2, 0.0, false),
        DataPosition::default(),
    )?;
    let mut skipped = Vec::new();
    let mut seen = 0;
    for _ in 0..8 {
        let batch = batcher.next_batch()?;
        assert_eq!(batch.samples.dim(0)?, 2, "batches stay full");
        assert!(!batch.indices.contains(&4));
        seen += batch.indices.len();
        skipped.extend(batch.skipped);
    }
    // Four epochs of 4 good images; the bad one reported once, with its path.
    assert_eq!(seen, 16);
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].path, bad);
    assert!(
        skipped[0].error.contains("broken.png"),
        "{}",
        skipped[0].error
    );

    let mut strict = Batcher::new(
        items,
        image_loader(transform),
        batch_config(5, 0.0, true),
        DataPosition::default(),
    )?;
    let err = format!("{:#}", strict.next_batch().unwrap_err());
    assert!(
        err.contains("broken.png") && err.contains("strict"),
        "{err}"
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn background_loader_gives_the_same_batches() -> Result<()> {
    let dir = scratch("data-loader");
    let items = Arc::new(image_dataset(&dir, 5));
    let transform = ImageTransform {
        resolution: 8,
        crop: CropMode::Random,
        random_flip: true,
    };
    let make = || {
        Batcher::new(
            items.clone(),
            image_loader(transform.clone()),
            batch_config(2, 0.5, false),
            DataPosition { epoch: 3, index: 1 },
        )
    };
    let mut direct = make()?;
    let mut loader = Loader::spawn(make()?, 2)?;
    for _ in 0..7 {
        let (a, b) = (direct.next_batch()?, loader.next_batch()?);
        assert_eq!(a.indices, b.indices);
        assert_eq!(a.captions, b.captions);
        assert_eq!(values(&a.samples), values(&b.samples));
    }
    // Dropping a loader whose thread is blocked on a full queue returns promptly.
    let start = std::time::Instant::now();
    drop(loader);
    assert!(start.elapsed().as_secs_f64() < 5.0);
    // A strict loader hands over the error, then reports that it stopped.
    std::fs::write(dir.join("0.png"), b"garbage")?;
    let strict = Batcher::new(
        items.clone(),
        image_loader(transform.clone()),
        batch_config(5, 0.0, true),
        DataPosition::default(),
    )?;
    let mut loader = Loader::spawn(strict, 2)?;
    assert!(format!("{:#}", loader.next_batch().unwrap_err()).contains("0.png"));
    assert!(loader
        .next_batch()
        .unwrap_err()
        .to_string()
        .contains("stopped"));
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Latent cache

/// A fake VAE: 2x2 average pooling (a "latent" that depends on every pixel), counting its calls
/// and images.
fn counting_encoder<'a>(
    calls: &'a std::cell::Cell<usize>,
    images: &'a std::cell::Cell<usize>,
) -> impl FnMut(&Tensor) -> Result<Tensor> + 'a {
    move |x: &Tensor| {
        calls.set(calls.get() + 1);
        images.set(images.get() + x.dim(0)?);
        Ok(x.avg_pool2d(2)?)
    }
}

fn cache_settings(flip: bool, encoder_id: &str) -> CacheSettings {
    CacheSettings {
        resolution: 8,
        crop: CropMode::Center,
        flip,
        encoder_id: encoder_id.into(),
    }
}

#[test]
fn latent_cache_encodes_once_and_notices_changes() -> Result<()> {
    let dir = scratch("latent-cache");
    std::fs::create_dir_all(dir.join("images"))?;
    let items = image_dataset(&dir.join("images"), 5);
    let cache_dir = dir.join("cache");
    let (calls, images) = (std::cell::Cell::new(0), std::cell::Cell::new(0));

    let cache = LatentCache::open(&cache_dir, cache_settings(false, "vae-a"))?;
    let first = cache.prepare(
        &items,
        2,
        false,
        counting_encoder(&calls, &images),
        |_, _| {},
    )?;
    assert_eq!(
        (first.encoded, first.reused, calls.get(), images.get()),
        (5, 0, 3, 5)
    );
    // The stored latent is what the encoder returned for that image.
    let transform = ImageTransform {
        resolution: 8,
        crop: CropMode::Center,
        random_flip: false,
    };
    let pixels = transform.load(&items[3].path, &mut ChaCha8Rng::seed_from_u64(0))?;
    let latent = LatentCache::load(first.entries[3].as_ref().unwrap(), false)?;
    assert_eq!(latent.dims(), &[3, 4, 4]);
    assert_eq!(
        values(&latent),
        values(&pixels.unsqueeze(0)?.avg_pool2d(2)?)
    );

    // A second run (a new cache object, as a new process would make) encodes nothing.
    let again = LatentCache::open(&cache_dir, cache_settings(false, "vae-a"))?;
    let second = again.prepare(
        &items,
        2,
        false,
        counting_encoder(&calls, &images),
        |_, _| {},
    )?;
    assert_eq!((second.encoded, second.reused, calls.get()), (0, 5, 3));
    assert_eq!(second.entries, first.entries);

    // Editing one image re-encodes that one only, under a new entry.
    image::RgbImage::from_pixel(8, 8, image::Rgb([9, 9, 9])).save(&items[1].path)?;
    let third = again.prepare(
        &items,
        2,
        false,
        counting_encoder(&calls, &images),
        |_, _| {},
    )?;
    assert_eq!((third.encoded, third.reused), (1, 4));
    assert_ne!(third.entries[1], first.entries[1]);
    assert_eq!(third.entries[0], first.entries[0]);

    // Another encoder (or resolution) is another key: everything is encoded again.
    let other = LatentCache::open(&cache_dir, cache_settings(false, "vae-b"))?;
    let fourth = other.prepare(
        &items,
        8,
        false,
        counting_encoder(&calls, &images),
        |_, _| {},
    )?;
    assert_eq!((fourth.encoded, fourth.reused), (5, 0));
    assert!(fourth
        .entries
        .iter()
        .zip(&third.entries)
        .all(|(a, b)| a != b));

    // A damaged entry is re-encoded rather than trusted.
    std::fs::write(third.entries[2].as_ref().unwrap(), b"torn")?;
    let fifth = again.prepare(
        &items,
        2,
        false,
        counting_encoder(&calls, &images),
        |_, _| {},
    )?;
    assert_eq!((fifth.encoded, fifth.reused), (1, 4));
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn latent_cache_flip_bad_images_and_loading() -> Result<()> {
    let dir = scratch("latent-flip");
    let mut items = image_dataset(&dir, 3);
    let bad = dir.join("bad.png");
    std::fs::write(&bad, b"nope")?;
    items.push(CaptionedImage {
        path: bad.clone(),
        caption: "bad".into(),
    });
    let (calls, images) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let cache = LatentCache::open(&dir.join("cache"), cache_settings(true, "vae"))?;
    let report = cache.prepare(
        &items,
        4,
        false,
        counting_encoder(&calls, &images),
        |_, _| {},
    )?;
    // Both orientations go through the encoder, in one call.
    assert_eq!((report.encoded, calls.get(), images.get()), (3, 1, 6));
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].path, bad);
    assert!(report.entries[3].is_none());
    let entry = report.entries[0].clone().unwrap();
    let (plain, flipped) = (
        LatentCache::load(&entry, false)?,
        LatentCache::load(&entry, true)?,
    );
    // The flipped latent is the encoding of the mirrored image (here: exactly the mirror).
    assert_close(
        &values(&flipped),
        &values(&plain.flip(&[2])?),
        1e-6,
        "flipped latent",
    );
    assert_ne!(values(&flipped), values(&plain));
    // Strict mode stops on the bad image.
    let err = cache
        .prepare(
            &items,
            4,
            true,
            counting_encoder(&calls, &images),
            |_, _| {},
        )
        .unwrap_err();
    assert!(format!("{err:#}").contains("bad.png"), "{err:#}");
    // The data loader reads cached latents, with both orientations used, and skips the bad one.
    let load = LatentCache::loader(report.entries.clone(), true);
    let mut batcher = Batcher::new(
        Arc::new(items),
        load,
        batch_config(3, 0.0, false),
        DataPosition::default(),
    )?;
    let mut orientations = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let batch = batcher.next_batch()?;
        assert_eq!(batch.samples.dims(), &[3, 3, 4, 4]);
        for (k, &i) in batch.indices.iter().enumerate() {
            let entry = report.entries[i].as_ref().unwrap();
            let got = values(&batch.samples.get(k)?);
            let flipped = got == values(&LatentCache::load(entry, true)?);
            assert!(flipped || got == values(&LatentCache::load(entry, false)?));
            orientations.insert(flipped);
        }
    }
    assert_eq!(orientations.len(), 2, "both orientations drawn");
    // Random crops cannot be cached.
    let random = CacheSettings {
        crop: CropMode::Random,
        ..cache_settings(false, "vae")
    };
    assert!(LatentCache::open(&dir.join("cache"), random).is_err());
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn file_identity_follows_content() -> Result<()> {
    let dir = scratch("identity");
    let (a, b) = (
        dir.join("diffusion_pytorch_model.safetensors"),
        dir.join("config.json"),
    );
    std::fs::write(&a, vec![7u8; 3 << 20])?; // several read blocks
    std::fs::write(&b, b"{\"scaling_factor\": 0.18215}")?;
    let id = file_identity(&[&a, &b])?;
    assert!(id.starts_with("fnv1a64:") && id.len() == 24, "{id}");
    assert_eq!(id, file_identity(&[&a, &b])?);
    std::fs::write(&b, b"{\"scaling_factor\": 0.13025}")?;
    assert_ne!(id, file_identity(&[&a, &b])?);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn sample_latent_from_moments() -> Result<()> {
    let dev = &Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let std_of = |z: &[f32], m: f32| {
        (z.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / z.len() as f32).sqrt()
    };
    // logvar -40 is clamped to -30: standard deviation exp(-15) = 3.06e-7, not exp(-20).
    let zeros = Tensor::zeros((1, 4, 32, 32), DType::F32, dev)?;
    let tight = Tensor::cat(&[&zeros, &Tensor::full(-40f32, (1, 4, 32, 32), dev)?], 1)?;
    let z = sample_latent(&tight, &mut rng)?;
    assert_eq!(z.dims(), &[1, 4, 32, 32]);
    let ratio = std_of(&values(&z), 0.0) / (-15f32).exp();
    assert!((ratio - 1.0).abs() < 0.05, "std / exp(-15) = {ratio}");
    let mean = Tensor::full(0.5f32, (1, 4, 32, 32), dev)?;
    // logvar = ln 4: standard deviation 2.
    let wide = Tensor::cat(&[&mean, &Tensor::full(4f32.ln(), (1, 4, 32, 32), dev)?], 1)?;
    let z = values(&sample_latent(&wide, &mut rng)?);
    let m = z.iter().sum::<f32>() / z.len() as f32;
    let sd = std_of(&z, m);
    assert!(
        (m - 0.5).abs() < 0.1 && (sd - 2.0).abs() < 0.1,
        "mean {m}, std {sd}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Metrics

fn record(step: u64, loss: f64) -> MetricsRecord {
    MetricsRecord {
        step,
        loss,
        smoothed_loss: loss,
        lr: 1e-4,
        grad_norm: Some(0.5),
        samples_per_sec: 10.0,
        time: 0.0,
    }
}

#[test]
fn metrics_log_appends_and_resumes() -> Result<()> {
    let dir = scratch("metrics");
    let path = dir.join("logs/metrics.jsonl");
    let mut log = MetricsLog::open(&path, None)?;
    for step in 1..=5 {
        log.write(&record(step, step as f64))?;
    }
    // Flushed at once: readable while the log is still open.
    assert_eq!(read_metrics(&path)?.len(), 5);
    drop(log);
    // A kill mid-line, then a resume from the checkpoint of step 3.
    let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
    std::io::Write::write_all(&mut f, b"{\"step\": 6, \"lo")?;
    let mut log = MetricsLog::open(&path, Some(3))?;
    log.write(&record(4, 40.0))?;
    let steps: Vec<(u64, f64)> = read_metrics(&path)?
        .iter()
        .map(|r| (r.step, r.loss))
        .collect();
    assert_eq!(steps, vec![(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]);
    // Without a resume step a torn line is ended, not glued to the next record.
    drop(log);
    let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
    std::io::Write::write_all(&mut f, b"{\"step\": 5, \"lo")?;
    MetricsLog::open(&path, None)?.write(&record(5, 50.0))?;
    assert_eq!(read_metrics(&path)?.last().unwrap().loss, 50.0);
    let line = std::fs::read_to_string(&path)?
        .lines()
        .nth(3)
        .unwrap()
        .to_string();
    assert!(
        line.contains("\"grad_norm\":0.5") && line.contains("\"samples_per_sec\":10.0"),
        "{line}"
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn smoothed_loss_and_finite_check() {
    let mut s = SmoothedLoss::new(0.9);
    assert!(s.value().is_nan());
    assert_eq!(
        s.update(2.0),
        2.0,
        "bias-corrected: the first value is itself"
    );
    // (0.9 * 0.1 * 2 + 0.1 * 4) / (1 - 0.81) = 0.58 / 0.19
    assert!((s.update(4.0) - 0.58 / 0.19).abs() < 1e-12);
    for _ in 0..500 {
        s.update(1.0);
    }
    assert!((s.value() - 1.0).abs() < 1e-12);
    assert!(check_finite(3, "loss", 0.25).is_ok());
    let err = check_finite(1234, "loss", f64::NAN)
        .unwrap_err()
        .to_string();
    assert!(err.contains("loss is NaN at step 1234"), "{err}");
    let err = check_finite(7, "grad norm", f64::INFINITY)
        .unwrap_err()
        .to_string();
    assert!(err.contains("grad norm is inf at step 7"), "{err}");
}
