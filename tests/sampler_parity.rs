//! Every sampler against diffusers (tests/fixtures/schedulers, made by
//! scripts/make_scheduler_fixtures.py): timesteps exactly, sigmas to float32 rounding, and the
//! latents of whole sampling runs on a toy denoiser with replayed noise.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sd_rs::sampler::{
    build_sampler, img2img_start_index, DdimSampler, DdpmSampler, DpmSolverMultistepSampler,
    EulerAncestralSampler, EulerSampler, NoiseSource, ReplayNoise, Sampler, SamplerKind,
    SeededNoise,
};
use sd_rs::schedule::{PredictionType, SchedulerConfig, TimestepSpacing, VarianceType};
use serde_json::Value;

fn load() -> (Value, HashMap<String, Tensor>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("schedulers.json")).unwrap())
            .unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("schedulers.safetensors"), &Device::Cpu).unwrap();
    (meta, tensors)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn vec1(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// max |a - b| / max(max |b|, 1): the error relative to the tensor's scale.
fn scaled_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (vec1(a), vec1(b));
    let scale = b.iter().fold(1f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

fn config(meta: &Value, name: &str, spacing: Option<&str>) -> SchedulerConfig {
    let mut cfg = SchedulerConfig::from_json_str(&meta["configs"][name].to_string()).unwrap();
    if let Some(s) = spacing {
        cfg.timestep_spacing = Some(s.parse::<TimestepSpacing>().unwrap());
    }
    cfg
}

/// The sampler named as in the fixture, and its sigma table where it has one.
fn build(name: &str, cfg: &SchedulerConfig, steps: usize) -> (Box<dyn Sampler>, Option<Vec<f64>>) {
    match name {
        "ddpm" => (Box::new(DdpmSampler::new(cfg, steps).unwrap()), None),
        "ddpm_fixed_large" => {
            let cfg = SchedulerConfig {
                variance_type: Some(VarianceType::FixedLarge),
                ..cfg.clone()
            };
            (Box::new(DdpmSampler::new(&cfg, steps).unwrap()), None)
        }
        "ddim" => (Box::new(DdimSampler::new(cfg, steps, 0.0).unwrap()), None),
        "ddim_eta" => (Box::new(DdimSampler::new(cfg, steps, 0.5).unwrap()), None),
        "euler" => {
            let s = EulerSampler::new(cfg, steps).unwrap();
            let sigmas = s.sigmas().to_vec();
            (Box::new(s), Some(sigmas))
        }
        "euler_a" => {
            let s = EulerAncestralSampler::new(cfg, steps).unwrap();
            let sigmas = s.sigmas().to_vec();
            (Box::new(s), Some(sigmas))
        }
        "dpmpp_2m" | "dpmpp_2m_karras" => {
            let s = DpmSolverMultistepSampler::new(cfg, steps, name.ends_with("karras")).unwrap();
            let sigmas = s.sigmas().to_vec();
            (Box::new(s), Some(sigmas))
        }
        other => panic!("unknown sampler {other}"),
    }
}

#[test]
fn timesteps_and_sigmas_equal_diffusers() {
    let (meta, _) = load();
    let tables = meta["tables"].as_array().unwrap();
    assert!(tables.len() >= 700, "only {} tables", tables.len());
    let (mut worst_sigma, mut worst_init) = (0f64, 0f64);
    for entry in tables {
        let (cname, sname) = (
            entry["config"].as_str().unwrap(),
            entry["sampler"].as_str().unwrap(),
        );
        let steps = entry["steps"].as_u64().unwrap() as usize;
        let mut cfg = config(&meta, cname, entry["spacing"].as_str());
        if sname == "euler_a" && cfg.prediction_type == PredictionType::Sample {
            // diffusers only refuses this at step(); we refuse at construction. The tables do
            // not depend on the prediction type.
            cfg.prediction_type = PredictionType::Epsilon;
        }
        let what = format!("{cname} {sname} spacing={} steps={steps}", entry["spacing"]);
        let (sampler, sigmas) = build(sname, &cfg, steps);

        // Timesteps: exactly (they are integers, or float32 values for Euler).
        let expected: Vec<f64> = floats(&entry["timesteps"])
            .iter()
            .map(|&t| t as f32 as f64)
            .collect();
        let got: Vec<f64> = sampler
            .timesteps()
            .iter()
            .map(|&t| t as f32 as f64)
            .collect();
        assert_eq!(got, expected, "{what}: timesteps");

        if let Some(sigmas) = sigmas {
            let expected: Vec<f64> = floats(&entry["sigmas"])
                .iter()
                .map(|&s| s as f32 as f64)
                .collect();
            assert_eq!(sigmas.len(), expected.len(), "{what}: number of sigmas");
            for (a, b) in sigmas.iter().zip(&expected) {
                let rel = (a - b).abs() / b.abs().max(1e-30);
                worst_sigma = worst_sigma.max(if *b == 0.0 { a.abs() } else { rel });
            }
            assert!(
                worst_sigma < 1e-6,
                "{what}: sigmas {sigmas:?} vs {expected:?}"
            );
        }
        let init = entry["init_noise_sigma"].as_f64().unwrap() as f32 as f64;
        let rel = (sampler.init_noise_sigma() - init).abs() / init;
        worst_init = worst_init.max(rel);
        assert!(
            rel < 1e-6,
            "{what}: init_noise_sigma {} vs {init}",
            sampler.init_noise_sigma()
        );
    }
    println!(
        "{} tables: timesteps all equal, sigmas max rel diff {worst_sigma:.2e}, init_noise_sigma {worst_init:.2e}",
        tables.len()
    );
}

/// The fixture's toy denoiser: W x_in over channels + bias * t / 1000.
fn toy_model(x_in: &Tensor, t: f64, weight: &Tensor, bias: &Tensor) -> Tensor {
    let (b, c, h, w) = x_in.dims4().unwrap();
    let mixed = x_in
        .permute((0, 2, 3, 1))
        .unwrap()
        .reshape((b * h * w, c))
        .unwrap()
        .matmul(&weight.t().unwrap())
        .unwrap()
        .reshape((b, h, w, c))
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap();
    let shift = bias
        .affine(t / 1000.0, 0.0)
        .unwrap()
        .reshape((1, c, 1, 1))
        .unwrap();
    mixed.broadcast_add(&shift).unwrap()
}

fn noise_stack(tensors: &HashMap<String, Tensor>) -> Vec<Tensor> {
    let noise = &tensors["noise"];
    (0..noise.dim(0).unwrap())
        .map(|i| noise.get(i).unwrap())
        .collect()
}

#[test]
fn sampling_runs_reproduce_diffusers_latents_step_by_step() {
    let (meta, tensors) = load();
    let runs = meta["runs"].as_array().unwrap();
    let (weight, bias) = (&tensors["toy/weight"], &tensors["toy/bias"]);
    let x_init = &tensors["x_init"];
    let mut covered: HashMap<String, usize> = HashMap::new();
    let mut worst = 0f64;
    for run in runs {
        let (cname, sname) = (
            run["config"].as_str().unwrap(),
            run["sampler"].as_str().unwrap(),
        );
        let key = run["key"].as_str().unwrap();
        let steps = run["steps"].as_u64().unwrap() as usize;
        let cfg = config(&meta, cname, None);
        let (mut sampler, _) = build(sname, &cfg, steps);
        let what = format!("{cname} {sname}");

        let expected_t: Vec<f64> = floats(&run["timesteps"])
            .iter()
            .map(|&t| t as f32 as f64)
            .collect();
        let got_t: Vec<f64> = sampler
            .timesteps()
            .iter()
            .map(|&t| t as f32 as f64)
            .collect();
        assert_eq!(got_t, expected_t, "{what}: timesteps");

        let latents_ref = &tensors[&format!("{key}/latents")];
        let out_ref = &tensors[&format!("{key}/model_out")];
        let x0_ref = &tensors[&format!("{key}/x0")];

        // Closed loop: our own sampler, our own toy model, the recorded noise.
        let mut noise = ReplayNoise::new(noise_stack(&tensors));
        let mut x = (x_init * sampler.init_noise_sigma()).unwrap();
        let mut run_worst = 0f64;
        for i in 0..steps {
            let t = sampler.timesteps()[i];
            let x_in = sampler.scale_model_input(&x, i).unwrap();
            let out = toy_model(&x_in, t, weight, bias);
            let d_out = scaled_diff(&out, &out_ref.get(i).unwrap());
            x = sampler.step(&out, i, &x, &mut noise).unwrap();
            let d_x = scaled_diff(&x, &latents_ref.get(i).unwrap());
            let d_x0 = scaled_diff(
                sampler.predicted_original().expect("x0 after a step"),
                &x0_ref.get(i).unwrap(),
            );
            run_worst = run_worst.max(d_out).max(d_x).max(d_x0);
            assert!(
                d_out < 1e-5 && d_x < 1e-5 && d_x0 < 1e-5,
                "{what} step {i}: model_out {d_out:e}, latents {d_x:e}, x0 {d_x0:e}"
            );
        }
        assert_eq!(
            noise.drawn() as u64,
            run["noise_draws"].as_u64().unwrap(),
            "{what}: number of noise draws"
        );

        // Open loop: each step from diffusers' own inputs must give diffusers' output.
        let (mut fresh, _) = build(sname, &cfg, steps);
        let mut noise = ReplayNoise::new(noise_stack(&tensors));
        let mut prev = (x_init * fresh.init_noise_sigma()).unwrap();
        for i in 0..steps {
            let next = fresh
                .step(&out_ref.get(i).unwrap(), i, &prev, &mut noise)
                .unwrap();
            let d = scaled_diff(&next, &latents_ref.get(i).unwrap());
            run_worst = run_worst.max(d);
            assert!(d < 1e-5, "{what} open-loop step {i}: {d:e}");
            prev = latents_ref.get(i).unwrap();
        }

        // img2img: the start index of get_timesteps and the noised start latents.
        let strength = run["img2img_strength"].as_f64().unwrap();
        let start = img2img_start_index(steps, strength);
        assert_eq!(start as u64, run["img2img_start_index"].as_u64().unwrap());
        let noisy = sampler
            .add_noise(&tensors["x_orig"], &tensors["noise"].get(0).unwrap(), start)
            .unwrap();
        let d = scaled_diff(&noisy, &tensors[&format!("{key}/img2img")]);
        run_worst = run_worst.max(d);
        assert!(d < 1e-6, "{what}: img2img add_noise {d:e}");

        println!("{what}: max scaled diff {run_worst:.2e}");
        worst = worst.max(run_worst);
        *covered.entry(sname.to_string()).or_default() += 1;
    }
    println!("{} runs, max scaled diff {worst:.2e}", runs.len());
    for s in [
        "ddpm",
        "ddpm_fixed_large",
        "ddim",
        "ddim_eta",
        "dpmpp_2m",
        "dpmpp_2m_karras",
        "euler",
    ] {
        assert_eq!(covered.get(s), Some(&4), "{s} must run on all 4 configs");
    }
    assert_eq!(covered.get("euler_a"), Some(&3));
}

#[test]
fn euler_ancestral_rejects_sample_prediction_like_diffusers() {
    let (meta, _) = load();
    let cfg = config(&meta, "linear_sample", None);
    assert!(EulerAncestralSampler::new(&cfg, 10).is_err());
    assert!(build_sampler(SamplerKind::EulerAncestral, &cfg, 10).is_err());
}

#[test]
fn sampler_names_parse_from_ours_and_a1111() {
    let cases = [
        ("ddpm", SamplerKind::Ddpm),
        ("DDPM", SamplerKind::Ddpm),
        ("ddim", SamplerKind::Ddim),
        ("DDIM", SamplerKind::Ddim),
        ("euler", SamplerKind::Euler),
        ("Euler", SamplerKind::Euler),
        ("euler-a", SamplerKind::EulerAncestral),
        ("Euler a", SamplerKind::EulerAncestral),
        ("EULER A", SamplerKind::EulerAncestral),
        ("euler_ancestral", SamplerKind::EulerAncestral),
        ("dpm++2m", SamplerKind::DpmPlusPlus2M),
        ("DPM++ 2M", SamplerKind::DpmPlusPlus2M),
        ("dpmpp_2m", SamplerKind::DpmPlusPlus2M),
        ("dpm++2m-karras", SamplerKind::DpmPlusPlus2MKarras),
        ("DPM++ 2M Karras", SamplerKind::DpmPlusPlus2MKarras),
        ("dpm++ 2m karras", SamplerKind::DpmPlusPlus2MKarras),
    ];
    for (name, kind) in cases {
        assert_eq!(name.parse::<SamplerKind>().unwrap(), kind, "{name}");
    }
    for kind in SamplerKind::ALL {
        assert_eq!(kind.to_string().parse::<SamplerKind>().unwrap(), kind);
        assert_eq!(kind.cli_name().parse::<SamplerKind>().unwrap(), kind);
    }
    assert_eq!(SamplerKind::EulerAncestral.to_string(), "Euler a");
    assert_eq!(
        SamplerKind::DpmPlusPlus2MKarras.to_string(),
        "DPM++ 2M Karras"
    );
    let err = format!("{:#}", "heun".parse::<SamplerKind>().unwrap_err());
    assert!(
        err.contains("heun") && err.contains("euler-a") && err.contains("Euler a"),
        "{err}"
    );
}

#[test]
fn build_sampler_matches_the_concrete_samplers() {
    let (meta, _) = load();
    let cfg = config(&meta, "sd15", None);
    let pairs = [
        (SamplerKind::Ddpm, "ddpm"),
        (SamplerKind::Ddim, "ddim"),
        (SamplerKind::Euler, "euler"),
        (SamplerKind::EulerAncestral, "euler_a"),
        (SamplerKind::DpmPlusPlus2M, "dpmpp_2m"),
        (SamplerKind::DpmPlusPlus2MKarras, "dpmpp_2m_karras"),
    ];
    for (kind, name) in pairs {
        let a = build_sampler(kind, &cfg, 20).unwrap();
        let (b, _) = build(name, &cfg, 20);
        assert_eq!(a.timesteps(), b.timesteps(), "{kind}");
        assert_eq!(a.init_noise_sigma(), b.init_noise_sigma(), "{kind}");
    }
}

#[test]
fn img2img_start_index_follows_get_timesteps() {
    assert_eq!(img2img_start_index(10, 1.0), 0);
    assert_eq!(img2img_start_index(10, 0.0), 10);
    assert_eq!(img2img_start_index(10, 0.3), 7);
    assert_eq!(img2img_start_index(10, 0.75), 3); // int(7.5) = 7 steps run
    assert_eq!(img2img_start_index(50, 0.8), 10);
    assert_eq!(img2img_start_index(20, 1.5), 0);
}

#[test]
fn seeded_noise_is_reproducible_and_per_sample_seeds_are_independent_of_the_batch() {
    let dev = Device::Cpu;
    let a = SeededNoise::new(42)
        .sample(&[2, 3, 4], DType::F32, &dev)
        .unwrap();
    let b = SeededNoise::new(42)
        .sample(&[2, 3, 4], DType::F32, &dev)
        .unwrap();
    assert_eq!(vec1(&a), vec1(&b));
    let c = SeededNoise::new(43)
        .sample(&[2, 3, 4], DType::F32, &dev)
        .unwrap();
    assert_ne!(vec1(&a), vec1(&c));

    // Image 1 of a batch seeded [42, 43] equals image 0 of a batch seeded alone with 43.
    let mut batch = SeededNoise::per_sample(&[42, 43]);
    let mut alone = SeededNoise::new(43);
    for _ in 0..3 {
        let x = batch.sample(&[2, 3, 4], DType::F32, &dev).unwrap();
        let y = alone.sample(&[1, 3, 4], DType::F32, &dev).unwrap();
        assert_eq!(vec1(&x.get(1).unwrap()), vec1(&y.get(0).unwrap()));
    }

    // Standard normal: mean ~0, variance ~1 (n = 100k, standard error of the mean 0.003).
    let z = vec1(
        &SeededNoise::new(7)
            .sample(&[100_000], DType::F32, &dev)
            .unwrap(),
    );
    let mean = z.iter().sum::<f64>() / z.len() as f64;
    let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / z.len() as f64;
    assert!(
        mean.abs() < 0.015 && (var - 1.0).abs() < 0.02,
        "mean {mean}, var {var}"
    );

    // Same numbers in another dtype (drawn in f32 first).
    let h = SeededNoise::new(42)
        .sample(&[2, 3, 4], DType::F64, &dev)
        .unwrap();
    assert_eq!(
        h.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn replay_noise_checks_shape_and_count() {
    let dev = Device::Cpu;
    let t = Tensor::zeros((2, 2), DType::F32, &dev).unwrap();
    let mut replay = ReplayNoise::new(vec![t.clone()]);
    assert!(replay.sample(&[3], DType::F32, &dev).is_err());
    let mut replay = ReplayNoise::new(vec![t]);
    assert!(replay.sample(&[2, 2], DType::F32, &dev).is_ok());
    assert_eq!((replay.drawn(), replay.remaining()), (1, 0));
    assert!(replay.sample(&[2, 2], DType::F32, &dev).is_err());
}

#[test]
fn dpm_solver_reset_starts_a_new_run() {
    let (meta, tensors) = load();
    let cfg = config(&meta, "sd15", None);
    let (weight, bias) = (&tensors["toy/weight"], &tensors["toy/bias"]);
    let mut sampler = build_sampler(SamplerKind::DpmPlusPlus2M, &cfg, 10).unwrap();
    let run = |s: &mut Box<dyn Sampler>| {
        let mut x = tensors["x_init"].clone();
        let mut noise = SeededNoise::new(0);
        for i in 0..10 {
            let out = toy_model(
                &s.scale_model_input(&x, i).unwrap(),
                s.timesteps()[i],
                weight,
                bias,
            );
            x = s.step(&out, i, &x, &mut noise).unwrap();
        }
        vec1(&x)
    };
    let first = run(&mut sampler);
    sampler.reset();
    assert_eq!(run(&mut sampler), first);
    assert!(sampler.predicted_original().is_some());
}

#[test]
fn configs_saved_by_diffusers_give_that_class_s_timesteps() {
    let (meta, _) = load();
    let saved = meta["saved_configs"].as_object().unwrap();
    let classes = [
        ("DDPMScheduler", "ddpm"),
        ("DDIMScheduler", "ddim"),
        ("EulerDiscreteScheduler", "euler"),
        ("EulerAncestralDiscreteScheduler", "euler_a"),
        ("DPMSolverMultistepScheduler", "dpmpp_2m"),
    ];
    for (class, sname) in classes {
        let cfg = SchedulerConfig::from_json_str(saved[class].as_str().unwrap()).unwrap();
        let entry = meta["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["config"] == "default"
                    && e["spacing"].is_null()
                    && e["steps"] == 25
                    && e["sampler"] == sname
            })
            .unwrap();
        let (sampler, _) = build(sname, &cfg, 25);
        let expected: Vec<f64> = floats(&entry["timesteps"])
            .iter()
            .map(|&t| t as f32 as f64)
            .collect();
        let got: Vec<f64> = sampler
            .timesteps()
            .iter()
            .map(|&t| t as f32 as f64)
            .collect();
        assert_eq!(got, expected, "{class}");
    }
}
