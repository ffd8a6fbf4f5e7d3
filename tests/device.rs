//! `--device` / `--dtype` parsing and the errors a build without a GPU backend gives.
//!
//! Runs in every build: the CPU-only build checks the "rebuild with --features cuda" errors,
//! a `cuda` build checks that asking for a GPU gives a real device or a clear driver error.
use candle_core::{DType, Device};
use sd_rs::device::{
    compiled_backends, dtype_warning, kernels_run_on, parse_dtype, resolve_dtype, select_device,
    DTypeSpec, DeviceSpec,
};

fn err_text(r: anyhow::Result<impl std::fmt::Debug>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn device_spec_parses_every_spelling() {
    let cases = [
        ("auto", DeviceSpec::Auto),
        ("cpu", DeviceSpec::Cpu),
        ("CPU", DeviceSpec::Cpu),
        ("cuda", DeviceSpec::Cuda(0)),
        ("gpu", DeviceSpec::Cuda(0)),
        ("cuda:0", DeviceSpec::Cuda(0)),
        ("cuda:3", DeviceSpec::Cuda(3)),
        (" cuda:12 ", DeviceSpec::Cuda(12)),
        ("metal", DeviceSpec::Metal),
        ("mps", DeviceSpec::Metal),
    ];
    for (text, want) in cases {
        assert_eq!(
            text.parse::<DeviceSpec>().unwrap(),
            want,
            "parsing {text:?}"
        );
    }
    assert_eq!(DeviceSpec::default(), DeviceSpec::Auto);
}

#[test]
fn device_spec_display_round_trips() {
    let specs = [
        DeviceSpec::Auto,
        DeviceSpec::Cpu,
        DeviceSpec::Cuda(0),
        DeviceSpec::Cuda(7),
        DeviceSpec::Metal,
    ];
    let shown: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
    assert_eq!(shown, ["auto", "cpu", "cuda:0", "cuda:7", "metal"]);
    for (spec, text) in specs.iter().zip(&shown) {
        assert_eq!(&text.parse::<DeviceSpec>().unwrap(), spec);
    }
}

#[test]
fn device_spec_rejects_nonsense_with_the_choices() {
    let msg = err_text("tpu".parse::<DeviceSpec>());
    assert!(msg.contains("\"tpu\""), "{msg}");
    assert!(msg.contains("auto, cpu, cuda, cuda:N or metal"), "{msg}");
    for bad in ["cuda:", "cuda:-1", "cuda:x", "cuda:1.5"] {
        let msg = err_text(bad.parse::<DeviceSpec>());
        assert!(msg.contains("GPU number"), "{bad}: {msg}");
    }
    assert!("".parse::<DeviceSpec>().is_err());
}

#[test]
fn dtype_spec_parses_and_displays() {
    let cases = [
        ("auto", DTypeSpec::Auto),
        ("f32", DTypeSpec::F32),
        ("fp32", DTypeSpec::F32),
        ("float32", DTypeSpec::F32),
        ("f16", DTypeSpec::F16),
        ("FP16", DTypeSpec::F16),
        ("half", DTypeSpec::F16),
        ("bf16", DTypeSpec::Bf16),
        ("bfloat16", DTypeSpec::Bf16),
    ];
    for (text, want) in cases {
        assert_eq!(text.parse::<DTypeSpec>().unwrap(), want, "parsing {text:?}");
    }
    let shown: Vec<String> = [
        DTypeSpec::Auto,
        DTypeSpec::F32,
        DTypeSpec::F16,
        DTypeSpec::Bf16,
    ]
    .iter()
    .map(|d| d.to_string())
    .collect();
    assert_eq!(shown, ["auto", "f32", "f16", "bf16"]);
    let msg = err_text("f64".parse::<DTypeSpec>());
    assert!(msg.contains("auto, f32, f16 or bf16"), "{msg}");
}

#[test]
fn cpu_is_always_available() {
    let device = select_device(&DeviceSpec::Cpu).unwrap();
    assert!(device.is_cpu());
    let shown = sd_rs::device::describe_device(&device);
    assert!(shown.starts_with("cpu ("), "{shown}");
}

#[test]
fn dtype_on_cpu_auto_is_f32_bf16_refused_f16_warned() {
    let cpu = Device::Cpu;
    assert_eq!(resolve_dtype(DTypeSpec::Auto, &cpu).unwrap(), DType::F32);
    assert_eq!(resolve_dtype(DTypeSpec::F32, &cpu).unwrap(), DType::F32);
    assert_eq!(resolve_dtype(DTypeSpec::F16, &cpu).unwrap(), DType::F16);
    let msg = err_text(resolve_dtype(DTypeSpec::Bf16, &cpu));
    assert!(msg.contains("bf16 does not work on the CPU"), "{msg}");
    assert!(msg.contains("--dtype f32"), "{msg}");

    assert_eq!(parse_dtype("f16", &cpu).unwrap(), DType::F16);
    assert_eq!(parse_dtype("auto", &cpu).unwrap(), DType::F32);
    assert!(parse_dtype("bf16", &cpu).is_err());
    assert!(parse_dtype("int8", &cpu).is_err());

    assert_eq!(dtype_warning(&cpu, DType::F32), None);
    let warning = dtype_warning(&cpu, DType::F16).expect("f16 on the CPU warns");
    assert!(warning.contains("more slowly than f32"), "{warning}");
}

/// Why bf16 is refused on the CPU: candle's CPU conv2d fails in bf16. When a candle upgrade
/// fixes that, this test fails and `resolve_dtype` can let bf16 through.
#[test]
fn candle_cpu_conv2d_still_lacks_bf16() {
    let x = candle_core::Tensor::zeros((1, 2, 4, 4), DType::BF16, &Device::Cpu).unwrap();
    let k = candle_core::Tensor::zeros((2, 2, 3, 3), DType::BF16, &Device::Cpu).unwrap();
    let msg = x.conv2d(&k, 1, 1, 1, 1).unwrap_err().to_string();
    assert!(msg.contains("unsupported dtype BF16"), "{msg}");
}

#[test]
fn compiled_backends_match_the_features() {
    let backends = compiled_backends();
    assert_eq!(backends.contains(&"cuda"), cfg!(feature = "cuda"));
    assert_eq!(backends.contains(&"cudnn"), cfg!(feature = "cudnn"));
    assert_eq!(backends.contains(&"metal"), cfg!(feature = "metal"));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cpu_build_says_how_to_get_cuda() {
    for spec in [DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)] {
        let msg = err_text(select_device(&spec));
        assert!(msg.contains("built without CUDA"), "{msg}");
        assert!(
            msg.contains("cargo build --release --features cuda"),
            "{msg}"
        );
    }
    // `auto` is the one choice that falls back quietly.
    assert!(select_device(&DeviceSpec::Auto).unwrap().is_cpu());
}

#[cfg(not(feature = "metal"))]
#[test]
fn build_without_metal_says_how_to_get_it() {
    let msg = err_text(select_device(&DeviceSpec::Metal));
    assert!(msg.contains("built without Metal"), "{msg}");
    assert!(msg.contains("--features metal"), "{msg}");
}

/// In a `cuda` build the outcome depends on the machine: on a GPU host `cuda:0` opens and an
/// ordinal past the last GPU names how many there are; where the driver is the link-time
/// stub (a CPU machine, see scripts/cuda_toolchain.sh) the error says the driver did not start,
/// and `auto` falls back to the CPU.
#[cfg(feature = "cuda")]
#[test]
fn cuda_build_opens_a_gpu_or_explains_why_not() {
    match select_device(&DeviceSpec::Cuda(0)) {
        Ok(device) => {
            assert!(device.is_cuda());
            let shown = sd_rs::device::describe_device(&device);
            assert!(shown.starts_with("cuda:0 ("), "{shown}");
            let msg = err_text(select_device(&DeviceSpec::Cuda(1000)));
            assert!(msg.contains("CUDA GPU(s), numbered 0 to"), "{msg}");
            assert!(select_device(&DeviceSpec::Auto).unwrap().is_cuda());
            // On CUDA `auto` is bf16.
            assert_eq!(
                resolve_dtype(DTypeSpec::Auto, &device).unwrap(),
                DType::BF16
            );
            assert_eq!(resolve_dtype(DTypeSpec::F16, &device).unwrap(), DType::F16);
        }
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("no usable GPU here: {msg}");
            assert!(
                msg.contains("CUDA driver did not start") || msg.contains("sees no GPU"),
                "{msg}"
            );
            assert!(select_device(&DeviceSpec::Auto).unwrap().is_cpu());
        }
    }
}

#[test]
fn kernel_compute_capability_rules() {
    // CUDA_COMPUTE_CAP=90 compiles sm_90a: Hopper only.
    assert!(kernels_run_on("90", 90).unwrap());
    assert!(!kernels_run_on("90", 89).unwrap());
    assert!(!kernels_run_on("90", 100).unwrap());
    assert!(kernels_run_on("sm_90a", 90).unwrap());
    assert!(kernels_run_on("9.0", 90).unwrap());
    // Below 9.0 the PTX is generic and JIT-compiles for any newer GPU.
    assert!(kernels_run_on("80", 86).unwrap());
    assert!(kernels_run_on("8.0", 90).unwrap());
    assert!(!kernels_run_on("80", 75).unwrap());
    assert!(kernels_run_on("75", 75).unwrap());
    // Family code (`f`) runs on the same major version at or above it.
    assert!(kernels_run_on("100f", 103).unwrap());
    assert!(!kernels_run_on("100f", 90).unwrap());
    assert!(!kernels_run_on("100f", 120).unwrap());
    assert!(kernels_run_on("121", 121).unwrap());
    assert!(kernels_run_on("120", 120).unwrap());
    assert!(!kernels_run_on("120", 121).unwrap());
    assert!(kernels_run_on("abc", 90).is_err());
}

/// The only test here that touches the environment, so no other test races with it.
#[test]
fn test_device_follows_sd_rs_test_device() {
    let saved = std::env::var("SD_RS_TEST_DEVICE").ok();
    std::env::remove_var("SD_RS_TEST_DEVICE");
    assert!(sd_rs::device::test_device().unwrap().is_cpu());
    std::env::set_var("SD_RS_TEST_DEVICE", "cpu");
    assert!(sd_rs::device::test_device().unwrap().is_cpu());
    std::env::set_var("SD_RS_TEST_DEVICE", "tpu");
    let msg = err_text(sd_rs::device::test_device());
    assert!(msg.contains("\"tpu\""), "{msg}");
    if !cfg!(feature = "cuda") {
        std::env::set_var("SD_RS_TEST_DEVICE", "cuda:0");
        let msg = err_text(sd_rs::device::test_device());
        assert!(
            msg.contains("SD_RS_TEST_DEVICE=cuda:0 is not usable"),
            "{msg}"
        );
        assert!(msg.contains("built without CUDA"), "{msg}");
    }
    match saved {
        Some(v) => std::env::set_var("SD_RS_TEST_DEVICE", v),
        None => std::env::remove_var("SD_RS_TEST_DEVICE"),
    }
}
