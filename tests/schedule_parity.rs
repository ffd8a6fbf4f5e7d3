//! The training-side noise schedule against diffusers' numbers
//! (tests/fixtures/schedulers, made by scripts/make_scheduler_fixtures.py), and the config reader.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sd_rs::schedule::{
    BetaSchedule, NoiseSchedule, PredictionType, SchedulerConfig, TimestepSpacing,
};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")
}

fn load() -> (Value, HashMap<String, Tensor>) {
    let dir = fixture_dir();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("schedulers.json")).unwrap())
            .unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("schedulers.safetensors"), &Device::Cpu).unwrap();
    (meta, tensors)
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

/// Largest |a - b| / max(|b|, floor) over the elements.
fn max_rel(a: &[f64], b: &[f64], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f64::max)
}

fn config(meta: &Value, name: &str) -> SchedulerConfig {
    SchedulerConfig::from_json_str(&meta["configs"][name].to_string()).unwrap()
}

#[test]
fn betas_and_alphas_cumprod_match_diffusers() {
    let (meta, tensors) = load();
    let names: Vec<String> = meta["configs"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(names.len(), 7, "configs: {names:?}");
    for name in &names {
        let schedule = NoiseSchedule::new(&config(&meta, name)).unwrap();
        let betas = vec1(&tensors[&format!("schedule/{name}/betas")]);
        let abar = vec1(&tensors[&format!("schedule/{name}/alphas_cumprod")]);
        assert_eq!(schedule.num_train_timesteps(), betas.len());
        let ab = max_rel(schedule.betas(), &betas, 1.0);
        let alphas: Vec<f64> = betas.iter().map(|b| (1.0 - *b as f32) as f64).collect();
        let rl = max_rel(schedule.alphas(), &alphas, 1e-12);
        // abar is compared relative to max(abar, 1e-3): at the end of the cosine and zero-SNR
        // schedules abar is ~0 and only its absolute error is meaningful.
        let ra = max_rel(schedule.alphas_cumprod(), &abar, 1e-3);
        println!(
            "{name}: betas max abs diff {ab:.2e}, alphas rel {rl:.2e}, alphas_cumprod rel {ra:.2e}"
        );
        assert!(ra < 1e-6, "{name}: alphas_cumprod differs by {ra:e}");
        // Our betas are 1 - alphas in f64, within half an ulp of 1 (6e-8) of diffusers'. For
        // sd21v, torch.linspace's vectorised kernel rounds a few float32 betas 1 ulp differently
        // from the scalar formula, and the zero-SNR rescale (1 - abar_t / abar_{t-1} in float32)
        // magnifies that to 7e-7 on a few betas, as it would between two CPUs of different
        // vector widths running diffusers.
        assert!(ab < 1e-6, "{name}: betas differ by {ab:e} absolute");
        assert!(rl < 1e-6, "{name}: alphas differ by {rl:e}");
    }
}

#[test]
fn zero_terminal_snr_rescale_matches_diffusers() {
    let (meta, tensors) = load();
    let schedule = NoiseSchedule::new(&config(&meta, "sd21v")).unwrap();
    let abar = vec1(&tensors["schedule/sd21v/alphas_cumprod"]);
    assert_eq!(abar[999], 0.0);
    assert_eq!(schedule.alphas_cumprod()[999], 0.0);
    assert_eq!(schedule.betas()[999], 1.0);
    assert_eq!(schedule.snr(999), 0.0);
    // The rescale keeps abar_0 of the plain schedule.
    let plain = NoiseSchedule::new(&config(&meta, "sd15")).unwrap();
    let (a, b) = (schedule.alphas_cumprod()[0], plain.alphas_cumprod()[0]);
    assert!((a - b).abs() < 1e-7, "{a} vs {b}");
}

#[test]
fn per_sample_q_sample_and_velocity_match_diffusers() {
    let (meta, tensors) = load();
    let ts: Vec<u32> = meta["q_sample_timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let x0 = &tensors["q_sample/x0"];
    let eps = &tensors["q_sample/noise"];
    for name in [
        "sd15",
        "sd21v",
        "cosine",
        "linear_sample",
        "sigmoid",
        "default",
    ] {
        let schedule = NoiseSchedule::new(&config(&meta, name)).unwrap();
        for t in [
            Tensor::new(ts.as_slice(), &Device::Cpu).unwrap(),
            Tensor::new(
                ts.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                &Device::Cpu,
            )
            .unwrap(),
        ] {
            let noisy = schedule.q_sample(x0, &t, eps).unwrap();
            let d = max_rel(
                &vec1(&noisy),
                &vec1(&tensors[&format!("q_sample/{name}")]),
                1.0,
            );
            let v = schedule.velocity(x0, eps, &t).unwrap();
            let dv = max_rel(&vec1(&v), &vec1(&tensors[&format!("velocity/{name}")]), 1.0);
            println!("{name}: q_sample max diff {d:.2e}, velocity {dv:.2e}");
            assert!(
                d < 1e-6 && dv < 1e-6,
                "{name}: q_sample {d:e}, velocity {dv:e}"
            );
        }
    }
}

#[test]
fn timesteps_must_be_integers_in_range_one_per_sample() {
    let schedule = NoiseSchedule::new(&SchedulerConfig::default()).unwrap();
    let x = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let bad_range = Tensor::new(&[0u32, 1000], &Device::Cpu).unwrap();
    let err = schedule.q_sample(&x, &bad_range, &x).unwrap_err();
    assert!(format!("{err:#}").contains("1000"), "{err:#}");
    let floats = Tensor::new(&[0f32, 1.0], &Device::Cpu).unwrap();
    assert!(schedule.q_sample(&x, &floats, &x).is_err());
    let wrong_batch = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
    assert!(schedule.q_sample(&x, &wrong_batch, &x).is_err());
}

#[test]
fn config_reader_ignores_unknown_keys_and_applies_diffusers_defaults() {
    let (meta, _) = load();
    let sd15 = config(&meta, "sd15_raw");
    assert_eq!(sd15.class_name.as_deref(), Some("PNDMScheduler"));
    assert_eq!(sd15.beta_schedule, BetaSchedule::ScaledLinear);
    assert_eq!(sd15.steps_offset, 1);
    assert_eq!(sd15.timestep_spacing, None);
    assert_eq!(sd15.set_alpha_to_one, Some(false));
    assert_eq!(sd15.trained_betas, None);
    assert_eq!(
        sd15,
        SchedulerConfig {
            class_name: Some("PNDMScheduler".into()),
            ..SchedulerConfig::stable_diffusion_v1()
        }
    );

    let empty = SchedulerConfig::from_json_str("{}").unwrap();
    assert_eq!(empty, SchedulerConfig::default());
    assert_eq!(empty.num_train_timesteps, 1000);
    assert_eq!((empty.beta_start, empty.beta_end), (0.0001, 0.02));
    assert_eq!(empty.beta_schedule, BetaSchedule::Linear);
    assert_eq!(empty.prediction_type, PredictionType::Epsilon);
    assert_eq!(empty.clip_sample_range, 1.0);
    assert!(empty.lower_order_final && !empty.rescale_betas_zero_snr);
    assert_eq!(
        empty.timestep_spacing_or(TimestepSpacing::Leading),
        TimestepSpacing::Leading
    );

    let v = config(&meta, "sd21v");
    assert_eq!(v.prediction_type, PredictionType::VPrediction);
    assert_eq!(v.timestep_spacing, Some(TimestepSpacing::Trailing));
    assert!(v.rescale_betas_zero_snr);
}

#[test]
fn unsupported_values_name_the_key_and_the_allowed_values() {
    let cases = [
        (
            r#"{"beta_schedule": "quadratic"}"#,
            "beta_schedule",
            "linear, scaled_linear, squaredcos_cap_v2, sigmoid",
        ),
        (
            r#"{"prediction_type": "flow_prediction"}"#,
            "prediction_type",
            "epsilon, v_prediction, sample",
        ),
        (
            r#"{"timestep_spacing": "middle"}"#,
            "timestep_spacing",
            "leading, trailing, linspace",
        ),
        (
            r#"{"variance_type": "learned_range"}"#,
            "variance_type",
            "fixed_small, fixed_large",
        ),
        (
            r#"{"final_sigmas_type": "one"}"#,
            "final_sigmas_type",
            "zero, sigma_min",
        ),
    ];
    for (json, key, allowed) in cases {
        let err = format!("{:#}", SchedulerConfig::from_json_str(json).unwrap_err());
        assert!(err.contains(key) && err.contains(allowed), "{json}: {err}");
    }
    let err = format!(
        "{:#}",
        SchedulerConfig::from_json_str(r#"{"num_train_timesteps": 3, "trained_betas": [0.1]}"#)
            .unwrap_err()
    );
    assert!(err.contains("trained_betas"), "{err}");
}

#[test]
fn config_round_trips_through_json() {
    let cfg = SchedulerConfig {
        timestep_spacing: Some(TimestepSpacing::Trailing),
        prediction_type: PredictionType::VPrediction,
        rescale_betas_zero_snr: true,
        lambda_min_clipped: Some(-5.1),
        ..SchedulerConfig::stable_diffusion_v1()
    };
    let json = serde_json::to_string_pretty(&cfg).unwrap();
    assert_eq!(SchedulerConfig::from_json_str(&json).unwrap(), cfg);
    let dir = std::env::temp_dir().join(format!("sd-rs-schedule-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scheduler_config.json");
    std::fs::write(&path, &json).unwrap();
    assert_eq!(SchedulerConfig::from_file(&path).unwrap(), cfg);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn trained_betas_replace_the_schedule() {
    let betas: Vec<f64> = (0..10).map(|i| 0.01 + 0.02 * i as f64).collect();
    let cfg = SchedulerConfig {
        num_train_timesteps: 10,
        trained_betas: Some(betas.clone()),
        ..SchedulerConfig::default()
    };
    let schedule = NoiseSchedule::new(&cfg).unwrap();
    let mut abar = 1.0;
    for (t, b) in betas.iter().enumerate() {
        abar *= 1.0 - b;
        // float32 like diffusers: betas to half an ulp of 1, abar to a few float32 ulps.
        assert!((schedule.betas()[t] - b).abs() < 1e-7);
        assert!((schedule.alphas_cumprod()[t] - abar).abs() < 1e-6);
    }
}

#[test]
fn configs_saved_by_diffusers_parse_including_minus_infinity() {
    let (meta, tensors) = load();
    let saved = meta["saved_configs"].as_object().unwrap();
    assert_eq!(saved.len(), 5);
    let abar_default = vec1(&tensors["schedule/default/alphas_cumprod"]);
    for (class, text) in saved {
        let cfg = SchedulerConfig::from_json_str(text.as_str().unwrap())
            .unwrap_or_else(|e| panic!("{class}: {e:#}"));
        assert_eq!(cfg.class_name.as_deref(), Some(class.as_str()));
        assert_eq!(cfg.num_train_timesteps, 1000);
        assert_eq!(cfg.beta_schedule, BetaSchedule::Linear);
        let schedule = NoiseSchedule::new(&cfg).unwrap();
        assert!(max_rel(schedule.alphas_cumprod(), &abar_default, 1e-3) < 1e-6);
    }
    let dpm_text = saved["DPMSolverMultistepScheduler"].as_str().unwrap();
    assert!(dpm_text.contains("\"lambda_min_clipped\": -Infinity"));
    let dpm = SchedulerConfig::from_json_str(dpm_text).unwrap();
    assert_eq!(dpm.lambda_min_clipped, None);
    assert_eq!(dpm.solver_order, Some(2));
    assert_eq!(dpm.algorithm_type.as_deref(), Some("dpmsolver++"));
    assert_eq!(dpm.timestep_spacing, Some(TimestepSpacing::Linspace));
    let ddpm = SchedulerConfig::from_json_str(saved["DDPMScheduler"].as_str().unwrap()).unwrap();
    assert_eq!(ddpm.timestep_spacing, Some(TimestepSpacing::Leading));
    assert_eq!(ddpm.clip_sample, Some(true));

    // Only bare tokens are rewritten, never text inside strings.
    let tricky = r#"{"_class_name": "NaN \"-Infinity\" Infinity", "lambda_min_clipped": -Infinity, "sigma_max": NaN}"#;
    let cfg = SchedulerConfig::from_json_str(tricky).unwrap();
    assert_eq!(
        cfg.class_name.as_deref(),
        Some(r#"NaN "-Infinity" Infinity"#)
    );
    assert_eq!((cfg.lambda_min_clipped, cfg.sigma_max), (None, None));
}
