//! AutoencoderKL against diffusers on a tiny random-weight VAE made by
//! scripts/make_unet_vae_fixtures.py: encoder posterior (mean, logvar, kl, a sample with given
//! noise), decoder, and diffusers' tiled encode/decode with blended seams.
//!
//! Also saves a VAE built by sd-rs to target/tmp/sd-rs-saved/vae for
//! `scripts/make_unet_vae_fixtures.py --check-saved target/tmp/sd-rs-saved`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sd_rs::model::vae::{AutoencoderKL, AutoencoderKLConfig, Tiling};
use sd_rs::model::weights::{load_component, read_config, save_component, save_safetensors_atomic};

mod common;
use common::{max_abs_diff, ShapeRecorder};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae")
}

fn load(dtype: DType) -> (AutoencoderKL, HashMap<String, Tensor>) {
    let dir = fixture();
    let (cfg, vb) = load_component::<AutoencoderKLConfig>(&dir, None, dtype, &Device::Cpu).unwrap();
    let vae = AutoencoderKL::new(vb, &cfg).unwrap();
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
    (vae, io)
}

/// Every output against diffusers; returns the largest difference.
fn parity(dtype: DType) -> f64 {
    let (vae, io) = load(dtype);
    let post = vae.encode(&io["image"]).unwrap();
    let tiling = vae.default_tiling().unwrap();
    assert_eq!(
        tiling,
        Tiling {
            sample_size: 16,
            overlap_factor: 0.25
        }
    );
    let tiled_post = vae.tiled_encode(&io["tiled_image"], &tiling).unwrap();
    let checks = [
        ("mean", post.mean.clone()),
        ("logvar", post.logvar.clone()),
        ("kl", post.kl().unwrap()),
        ("sample", post.sample(&io["noise"]).unwrap()),
        ("decoded", vae.decode(&io["latents"]).unwrap()),
        ("tiled_mean", tiled_post.mean.clone()),
        ("tiled_logvar", tiled_post.logvar.clone()),
        (
            "tiled_decoded",
            vae.tiled_decode(&io["tiled_latents"], &tiling).unwrap(),
        ),
    ];
    let mut worst = 0f64;
    for (name, ours) in checks {
        let expected = &io[name];
        let diff = max_abs_diff(&ours, expected);
        let scale = max_abs_diff(expected, &expected.zeros_like().unwrap());
        println!(
            "vae {name} ({dtype:?}): {:?}, max |x| {scale:.3}, max abs diff to diffusers {diff:.3e}",
            ours.dims()
        );
        // kl sums over all latent elements, so its absolute error scales with its size.
        let diff = if name == "kl" {
            diff / scale.max(1.0)
        } else {
            diff
        };
        worst = worst.max(diff);
    }
    worst
}

#[test]
fn vae_matches_diffusers_f32() {
    assert!(parity(DType::F32) < 1e-4);
}

#[test]
fn vae_matches_diffusers_f64() {
    assert!(parity(DType::F64) < 2e-6);
}

#[test]
fn tiled_decode_blends_seams_and_differs_from_untiled() {
    // The tiled result is its own thing (as in diffusers): same shape, close to but not equal
    // to the untiled decode, and its first tile's unblended corner equals decoding that tile.
    let (vae, io) = load(DType::F32);
    let z = &io["tiled_latents"];
    let tiling = vae.default_tiling().unwrap();
    let tiled = vae.tiled_decode(z, &tiling).unwrap();
    let full = vae.decode(z).unwrap();
    assert_eq!(tiled.dims(), full.dims());
    assert!(max_abs_diff(&tiled, &full) > 1e-3);
    let first_tile = vae
        .decode(&z.narrow(2, 0, 8).unwrap().narrow(3, 0, 8).unwrap())
        .unwrap();
    // Pixels [0, 12) of the first tile are kept; the left/top 4 are blended only for later tiles.
    let corner = |t: &Tensor| t.narrow(2, 0, 12).unwrap().narrow(3, 0, 12).unwrap();
    assert!(max_abs_diff(&corner(&tiled), &corner(&first_tile)) < 1e-6);
}

#[test]
fn latent_scaling_uses_config_factor() {
    let (vae, io) = load(DType::F32);
    assert_eq!(vae.config().scaling_factor, 0.13025);
    let raw = &io["latents"];
    let scaled = vae.scale_latents(raw).unwrap();
    assert!(max_abs_diff(&scaled, &(raw * 0.13025).unwrap()) < 1e-7);
    let back = vae.unscale_latents(&scaled).unwrap();
    assert!(max_abs_diff(&back, raw) < 1e-6);
    // latents_from_image without noise is the scaled posterior mean.
    let lat = vae.latents_from_image(&io["image"], None).unwrap();
    assert!(max_abs_diff(&lat, &(&io["mean"] * 0.13025).unwrap()) < 1e-4 * 0.13025 * 10.0);
    // image_from_latents inverts the scaling before decoding.
    let img = vae.image_from_latents(&(raw * 0.13025).unwrap()).unwrap();
    assert!(max_abs_diff(&img, &io["decoded"]) < 1e-4);
}

#[test]
fn shift_factor_and_default_scaling() {
    let mut cfg: AutoencoderKLConfig = read_config(&fixture()).unwrap();
    cfg.shift_factor = Some(0.5);
    cfg.scaling_factor = 0.3;
    let vae = AutoencoderKL::new(VarBuilder::zeros(DType::F32, &Device::Cpu), &cfg).unwrap();
    let raw = Tensor::new(&[1.5f32, -0.5, 0.5, 2.5], &Device::Cpu)
        .unwrap()
        .reshape((1, 4, 1, 1))
        .unwrap();
    let scaled = vae.scale_latents(&raw).unwrap();
    let expected = Tensor::new(&[0.3f32, -0.3, 0.0, 0.6], &Device::Cpu)
        .unwrap()
        .reshape((1, 4, 1, 1))
        .unwrap();
    assert!(max_abs_diff(&scaled, &expected) < 1e-6);
    // A config without scaling_factor gets diffusers' default (SD1.x's 0.18215).
    let json = serde_json::json!({"block_out_channels": [8], "norm_num_groups": 4});
    let cfg: AutoencoderKLConfig = serde_json::from_value(json).unwrap();
    assert_eq!(cfg.scaling_factor, 0.18215);
    assert_eq!(cfg.shift_factor, None);
}

#[test]
fn saved_by_sd_rs_reloads_identically() {
    let cfg: AutoencoderKLConfig = read_config(&fixture()).unwrap();
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vae = AutoencoderKL::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg).unwrap();
    let io = candle_core::safetensors::load(fixture().join("io.safetensors"), &dev).unwrap();
    let post = vae.encode(&io["image"]).unwrap();
    let decoded = vae.decode(&io["latents"]).unwrap();

    let saved = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sd-rs-saved");
    let dir = saved.join("vae");
    save_component(&dir, "AutoencoderKL", &cfg, &varmap, None).unwrap();
    let (cfg2, vb2) = load_component::<AutoencoderKLConfig>(&dir, None, DType::F32, &dev).unwrap();
    let reloaded = AutoencoderKL::new(vb2, &cfg2).unwrap();
    let diff = max_abs_diff(&reloaded.decode(&io["latents"]).unwrap(), &decoded);
    println!(
        "saved {} tensors to {}; reload diff {diff:.3e}",
        varmap.all_vars().len(),
        dir.display()
    );
    assert_eq!(diff, 0.0);

    let io_out: HashMap<String, Tensor> = HashMap::from([
        ("image".to_string(), io["image"].clone()),
        ("latents".to_string(), io["latents"].clone()),
        ("mean".to_string(), post.mean.contiguous().unwrap()),
        ("logvar".to_string(), post.logvar.contiguous().unwrap()),
        ("decoded".to_string(), decoded),
    ]);
    save_safetensors_atomic(&saved.join("vae_io.safetensors"), &io_out, None).unwrap();
}

#[test]
fn full_size_architecture_matches_diffusers() {
    // The SD VAE's config as diffusers writes it; names and shapes of every tensor must equal
    // diffusers' state_dict (recorded by the fixture script on the meta device).
    let path = fixture().join("real_architectures.json");
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (name, entry) in table.as_object().unwrap() {
        let cfg: AutoencoderKLConfig = serde_json::from_value(entry["config"].clone()).unwrap();
        let recorder = ShapeRecorder::default();
        AutoencoderKL::new(recorder.var_builder(), &cfg).unwrap();
        let (n_tensors, n_params, hash) = recorder.signature();
        println!(
            "vae {name}: {n_tensors} tensors, {n_params} parameters, names+shapes hash {hash}"
        );
        assert_eq!(
            n_tensors as u64,
            entry["n_tensors"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            n_params as u64,
            entry["n_params"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(hash, entry["fnv1a64"].as_str().unwrap(), "{name}");
    }
}
