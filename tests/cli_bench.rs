//! `sd-rs bench --profile`: the time per kind of layer that the GPU sessions rely on (they have
//! no profiler). On the tiny SD 1.5-shaped fixture: every layer of the checkpoint is counted
//! once per forward pass, the layers' times fit inside the run, and profiling does not change
//! what is computed.
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

mod common;
use common::sd_rs;

const MODEL: &str = "tests/fixtures/pipeline/sd15";

fn bench(name: &str, extra: &[&str]) -> Value {
    let home = common::temp_dir("cli_bench", name);
    let mut args = vec![
        "bench", "--model", MODEL, "--case", "unet", "--device", "cpu", "--warmup", "1",
        "--repeat", "2",
    ];
    args.extend_from_slice(extra);
    let run = sd_rs(&home, &args);
    run.ok();
    serde_json::from_str(run.stdout.trim()).expect("one JSON line on stdout")
}

/// How many tensors of the U-Net checkpoint satisfy `pick(name, rank)`.
fn count_tensors(pick: impl Fn(&str, usize) -> bool) -> f64 {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(MODEL)
        .join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .tensors()
        .iter()
        .filter(|(name, view)| pick(name, view.shape().len()))
        .count() as f64
}

#[test]
fn profile_counts_each_layer_once_per_run_and_changes_no_output() {
    let plain = bench("plain", &[]);
    assert!(plain.get("profile").is_none(), "no profile unless asked");
    let profiled = bench("profiled", &["--profile"]);
    assert_eq!(
        plain["check"], profiled["check"],
        "profiling must not change the output"
    );

    let profile = &profiled["profile"];
    let calls: BTreeMap<&str, f64> = profile["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["kind"].as_str().unwrap(), l["calls"].as_f64().unwrap()))
        .collect();
    // Per timed run (the warm-up run is not counted): each convolution weight (rank 4) is one
    // conv2d call, each transformer block has three layer norms and two attentions.
    assert_eq!(calls["conv2d"], count_tensors(|_, rank| rank == 4));
    assert_eq!(
        calls["layer norm"],
        count_tensors(|n, _| n.contains("transformer_blocks")
            && (n.ends_with("norm1.weight")
                || n.ends_with("norm2.weight")
                || n.ends_with("norm3.weight")))
    );
    assert_eq!(
        calls["attention (scores, softmax, values)"],
        count_tensors(|n, _| n.ends_with(".to_q.weight"))
    );

    let run_s = profile["run_s"].as_f64().unwrap();
    let layers_s: f64 = profile["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["seconds"].as_f64().unwrap())
        .sum();
    assert!(
        layers_s > 0.0 && layers_s <= run_s,
        "{layers_s} s of {run_s} s"
    );
    let other = profile["other_s"].as_f64().unwrap();
    assert!((run_s - layers_s - other).abs() < 1e-9);
}
