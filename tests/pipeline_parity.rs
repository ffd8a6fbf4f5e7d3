//! End to end against diffusers: the same tiny model directories, prompts and initial latents
//! give the same final latents and decoded images as diffusers' own pipelines
//! (fixtures: scripts/make_pipeline_fixtures.py).
use candle_core::{safetensors, DType, Device};
use sd_rs::pipeline::{GenerateRequest, Pipeline};
use sd_rs::sampler::{ReplayNoise, SamplerKind};
use std::path::Path;

mod common;
use common::max_abs_diff;

/// The binary's allocator, so these models load as `sd-rs generate` loads them: weights used in
/// place from the mapped files (src/mapped.rs).
#[global_allocator]
static ALLOC: sd_rs::mapped::MappedAlloc = sd_rs::mapped::MappedAlloc;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pipeline")
        .join(name)
}

fn check_family(name: &str) {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("cases.json")).unwrap()).unwrap();
    let case = &cases[name];
    let device = Device::Cpu;
    let dir = fixture(name);
    let expected = safetensors::load(dir.join("expected.safetensors"), &device).unwrap();
    let pipeline = Pipeline::load(&dir, &device, DType::F32).unwrap();
    for (sampler, kind) in [("ddim", SamplerKind::Ddim), ("euler", SamplerKind::Euler)] {
        let req = GenerateRequest {
            prompt: case["prompt"].as_str().unwrap(),
            negative_prompt: case["negative_prompt"].as_str().unwrap(),
            seeds: vec![0, 1],
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance_scale: case["guidance_scale"].as_f64().unwrap(),
            sampler: kind,
            width: case["width"].as_u64().unwrap() as usize,
            height: case["height"].as_u64().unwrap() as usize,
            init_image: None,
            strength: 1.0,
            show_x0: &[],
        };
        let mut noise = ReplayNoise::new([expected["initial_latents"].clone()]);
        let (latents, _) = pipeline.denoise(&req, &mut noise, &mut |_, _| {}).unwrap();
        let want = &expected[&format!("{sampler}_latents")];
        let scale = max_abs_diff(want, &want.zeros_like().unwrap());
        let diff = max_abs_diff(&latents, want);
        println!(
            "{name} {sampler}: final latents max abs diff {diff:.2e} (max |latent| {scale:.2})"
        );
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{name} {sampler}: latents differ by {diff}"
        );

        let image = ((pipeline.decode(&latents).unwrap() / 2.0).unwrap() + 0.5)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        let diff = max_abs_diff(&image, &expected[&format!("{sampler}_image")]);
        println!("{name} {sampler}: decoded image max abs diff {diff:.2e}");
        assert!(diff <= 1e-4, "{name} {sampler}: images differ by {diff}");
    }
}

#[test]
fn sd15_matches_diffusers() {
    check_family("sd15");
}

#[test]
fn sd2_v_prediction_matches_diffusers() {
    check_family("sd2");
}

#[test]
fn sdxl_matches_diffusers() {
    check_family("sdxl");
}
