//! The U-Net against diffusers: tiny random-weight SD1.x-, SD2.x- and SDXL-like models made by
//! scripts/make_unet_vae_fixtures.py (weights in diffusers' layout, inputs and diffusers'
//! outputs in io.safetensors; batch 2 with a different timestep per sample).
//!
//! Also the other direction: a U-Net built and saved by sd-rs reloads here with identical
//! outputs, and is left in target/tmp/sd-rs-saved/unet for
//! `scripts/make_unet_vae_fixtures.py --check-saved target/tmp/sd-rs-saved` to load in diffusers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sd_rs::model::layers::{attention, attention_chunked};
use sd_rs::model::unet::{SdxlAddedCond, UNet2DConditionConfig, UNet2DConditionModel};
use sd_rs::model::weights::{
    load_component, load_varmap_from_component, read_config, save_component,
    save_safetensors_atomic,
};

mod common;
use common::{max_abs_diff, ShapeRecorder};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/unet")
        .join(name)
}

fn load_io(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap()
}

fn run(unet: &UNet2DConditionModel, io: &HashMap<String, Tensor>) -> Tensor {
    let added = io.get("text_embeds").map(|t| SdxlAddedCond {
        text_embeds: t.clone(),
        time_ids: io["time_ids"].clone(),
    });
    unet.forward(
        &io["sample"],
        &io["timesteps"],
        &io["encoder_hidden_states"],
        added.as_ref(),
    )
    .unwrap()
}

/// Loads fixture `name` in `dtype` and returns the max abs diff to diffusers' output.
fn parity(name: &str, variant: Option<&str>, dtype: DType) -> f64 {
    let dir = fixture(name);
    let (cfg, vb) =
        load_component::<UNet2DConditionConfig>(&dir, variant, dtype, &Device::Cpu).unwrap();
    let unet = UNet2DConditionModel::new(vb, &cfg).unwrap();
    let io = load_io(&dir);
    let out = run(&unet, &io);
    let expected = &io["out"];
    let diff = max_abs_diff(&out, expected);
    let scale = max_abs_diff(expected, &expected.zeros_like().unwrap());
    println!(
        "unet {name} ({dtype:?}): out {:?}, max |out| {scale:.3}, max abs diff to diffusers {diff:.3e}",
        out.dims()
    );
    diff
}

#[test]
fn sd15_matches_diffusers_f32() {
    assert!(parity("sd15", None, DType::F32) < 1e-4);
}

#[test]
fn sd15_matches_diffusers_f64() {
    // The reference is diffusers in float64 stored as f32: only f32 rounding (~1e-7) remains.
    assert!(parity("sd15", None, DType::F64) < 2e-6);
}

#[test]
fn sd2_fp16_variant_matches_diffusers_f32() {
    assert!(parity("sd2", Some("fp16"), DType::F32) < 1e-4);
}

#[test]
fn sd2_fp16_variant_matches_diffusers_f64() {
    assert!(parity("sd2", Some("fp16"), DType::F64) < 2e-6);
}

#[test]
fn sdxl_sharded_bf16_matches_diffusers_f32() {
    assert!(parity("sdxl", None, DType::F32) < 1e-4);
}

#[test]
fn sdxl_sharded_bf16_matches_diffusers_f64() {
    assert!(parity("sdxl", None, DType::F64) < 2e-6);
}

#[test]
fn per_sample_timesteps_are_independent() {
    // Running the batch at once equals running each sample with its own timestep.
    let dir = fixture("sd15");
    let (cfg, vb) =
        load_component::<UNet2DConditionConfig>(&dir, None, DType::F32, &Device::Cpu).unwrap();
    let unet = UNet2DConditionModel::new(vb, &cfg).unwrap();
    let io = load_io(&dir);
    let both = run(&unet, &io);
    for i in 0..2 {
        let one = unet
            .forward(
                &io["sample"].narrow(0, i, 1).unwrap(),
                &io["timesteps"].narrow(0, i, 1).unwrap(),
                &io["encoder_hidden_states"].narrow(0, i, 1).unwrap(),
                None,
            )
            .unwrap();
        let diff = max_abs_diff(&one, &both.narrow(0, i, 1).unwrap());
        assert!(diff < 1e-5, "sample {i}: {diff}");
    }
    // And the timestep matters: swapping them changes the output.
    let swapped = unet
        .forward(
            &io["sample"],
            &Tensor::new(&[17f32, 999.], &Device::Cpu).unwrap(),
            &io["encoder_hidden_states"],
            None,
        )
        .unwrap();
    assert!(max_abs_diff(&swapped, &both) > 1e-2);
}

#[test]
fn missing_weights_error_names_path_and_candidates() {
    // sd2 only has the fp16 variant file, so asking for the plain weights finds nothing.
    let dir = fixture("sd2");
    let err = load_component::<UNet2DConditionConfig>(&dir, None, DType::F32, &Device::Cpu)
        .err()
        .expect("loading without the fp16 variant must fail");
    let msg = format!("{err:#}");
    println!("{msg}");
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
    assert!(msg.contains("model.safetensors.index.json"), "{msg}");
}

#[test]
fn misshaped_tensor_error_names_tensor_file_and_shapes() {
    let dir = fixture("sd15");
    let mut cfg: UNet2DConditionConfig = read_config(&dir).unwrap();
    cfg.cross_attention_dim = sd_rs::model::unet::PerBlock::One(24);
    let (_, vb) =
        load_component::<UNet2DConditionConfig>(&dir, None, DType::F32, &Device::Cpu).unwrap();
    let msg = format!("{:#}", UNet2DConditionModel::new(vb, &cfg).unwrap_err());
    println!("{msg}");
    assert!(msg.contains("attn2.to_k.weight"), "{msg}");
    assert!(msg.contains("[8, 16]") && msg.contains("[8, 24]"), "{msg}");
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
}

#[test]
fn unsupported_config_values_are_named() {
    let dir = fixture("sd15");
    let base: serde_json::Value = read_config(&dir).unwrap();
    for (key, value) in [
        ("class_embed_type", serde_json::json!("timestep")),
        ("act_fn", serde_json::json!("gelu")),
        ("addition_embed_type", serde_json::json!("image")),
        (
            "down_block_types",
            serde_json::json!([
                "SimpleCrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D"
            ]),
        ),
        ("attention_head_dim", serde_json::json!([2, 2])),
    ] {
        let mut json = base.clone();
        json[key] = value.clone();
        let cfg: UNet2DConditionConfig = serde_json::from_value(json).unwrap();
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let msg = format!("{:#}", UNet2DConditionModel::new(vb, &cfg).unwrap_err());
        println!("{key}: {msg}");
        assert!(msg.contains(key), "{msg}");
    }
}

#[test]
fn saved_by_sd_rs_reloads_identically() {
    // A U-Net trained by sd-rs lives in a VarMap; save it in diffusers' layout and load it back.
    let cfg: UNet2DConditionConfig = read_config(&fixture("sd15")).unwrap();
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let unet = UNet2DConditionModel::new(vb, &cfg).unwrap();
    let io = load_io(&fixture("sd15"));
    let out = run(&unet, &io);

    let saved = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sd-rs-saved");
    let dir = saved.join("unet");
    save_component(&dir, "UNet2DConditionModel", &cfg, &varmap, None).unwrap();
    let (cfg2, vb2) =
        load_component::<UNet2DConditionConfig>(&dir, None, DType::F32, &dev).unwrap();
    let reloaded = UNet2DConditionModel::new(vb2, &cfg2).unwrap();
    let diff = max_abs_diff(&run(&reloaded, &io), &out);
    let n_tensors = varmap.all_vars().len();
    println!(
        "saved {n_tensors} tensors to {}; reload diff {diff:.3e}",
        dir.display()
    );
    assert_eq!(diff, 0.0);

    // Inputs and sd-rs' outputs for the diffusers-side check.
    let mut io_out: HashMap<String, Tensor> = io
        .iter()
        .filter(|(k, _)| *k != "out")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    io_out.insert("out".into(), out);
    save_safetensors_atomic(&saved.join("unet_io.safetensors"), &io_out, None).unwrap();
}

#[test]
fn chunked_attention_is_exact_with_gradients() {
    // Splitting the queries bounds memory; it must not change values or gradients.
    let dev = Device::Cpu;
    let q = candle_core::Var::randn(0f64, 1., (2, 3, 7, 4), &dev).unwrap();
    let k = candle_core::Var::randn(0f64, 1., (2, 3, 5, 4), &dev).unwrap();
    let v = candle_core::Var::randn(0f64, 1., (2, 3, 5, 4), &dev).unwrap();
    let probe = Tensor::randn(0f64, 1., (2, 3, 7, 4), &dev).unwrap();
    let full = attention(&q, &k, &v, 0.5).unwrap();
    // 2*3*5 = 30 scores per query row: 40 allows one row per chunk, 100 three rows.
    for max in [40, 100] {
        let chunked = attention_chunked(&q, &k, &v, 0.5, max).unwrap();
        assert!(max_abs_diff(&full, &chunked) < 1e-14);
        let g_full = (&full * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_chunk = (&chunked * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [&q, &k, &v] {
            let a = g_full.get(var.as_tensor()).unwrap();
            let b = g_chunk.get(var.as_tensor()).unwrap();
            assert!(max_abs_diff(a, b) < 1e-12);
        }
    }
    // And it is softmax(q k^T * scale) v.
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * 0.5).unwrap();
    let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
    let reference = probs.matmul(&v).unwrap();
    assert!(max_abs_diff(&full, &reference) < 1e-12);
}

#[test]
fn full_size_architectures_match_diffusers() {
    // SD1.5, SD2.1 and SDXL configs as diffusers writes them; names and shapes of every tensor
    // must equal diffusers' state_dict (recorded by the fixture script on the meta device).
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet/real_architectures.json");
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (name, entry) in table.as_object().unwrap() {
        let cfg: UNet2DConditionConfig = serde_json::from_value(entry["config"].clone()).unwrap();
        let recorder = ShapeRecorder::default();
        UNet2DConditionModel::new(recorder.var_builder(), &cfg).unwrap();
        let (n_tensors, n_params, hash) = recorder.signature();
        println!(
            "unet {name}: {n_tensors} tensors, {n_params} parameters, names+shapes hash {hash}"
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

#[test]
fn pretrained_weights_load_into_a_varmap_for_training() {
    // Fine-tuning starts from a VarMap filled from a diffusers checkpoint (here the fp16
    // variant, cast to the f32 variables).
    let dir = fixture("sd2");
    let cfg: UNet2DConditionConfig = read_config(&dir).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let unet = UNet2DConditionModel::new(vb, &cfg).unwrap();
    load_varmap_from_component(&varmap, &dir, Some("fp16")).unwrap();
    let io = load_io(&dir);
    let diff = max_abs_diff(&run(&unet, &io), &io["out"]);
    println!(
        "VarMap filled from {}: max abs diff to diffusers {diff:.3e}",
        dir.display()
    );
    assert!(diff < 1e-4);
    // A checkpoint that lacks some of the model's tensors is an error naming them.
    let cfg_xl: UNet2DConditionConfig = read_config(&fixture("sdxl")).unwrap();
    let varmap_xl = VarMap::new();
    UNet2DConditionModel::new(
        VarBuilder::from_varmap(&varmap_xl, DType::F32, &Device::Cpu),
        &cfg_xl,
    )
    .unwrap();
    let msg = format!(
        "{:#}",
        load_varmap_from_component(&varmap_xl, &fixture("sd15"), None).unwrap_err()
    );
    assert!(msg.contains("add_embedding.linear_1.weight"), "{msg}");
}
