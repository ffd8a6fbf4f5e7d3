//! Where the tensors live and in which precision: `--device` and `--dtype` for every command.
//!
//! `--device auto|cpu|cuda|cuda:N|metal` is parsed into a [`DeviceSpec`] and turned into a
//! candle [`Device`] by [`select_device`]; `--dtype auto|f32|f16|bf16` is parsed into a
//! [`DTypeSpec`] and checked against the device by [`resolve_dtype`] ([`parse_dtype`] does
//! both and prints any warning).
//!
//! GPU support is chosen when sd-rs is compiled (cargo features `cuda`, `cudnn`, `metal`), so
//! the same command line can meet a binary without the backend it asks for; that is an error
//! that says how to rebuild, never a silent fall back to the CPU. Only `auto` falls back.
use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// How to get CUDA support, for error messages.
#[cfg(not(feature = "cuda"))]
const REBUILD_CUDA: &str = "this sd-rs was built without CUDA; rebuild with \
    `cargo build --release --features cuda` (see README, \"CUDA\")";
#[cfg(not(feature = "metal"))]
const REBUILD_METAL: &str = "this sd-rs was built without Metal; rebuild with \
    `cargo build --release --features metal` (macOS only)";

/// The `--device` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The first CUDA GPU when this build has CUDA and a GPU answers, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA GPU by ordinal; `cuda` alone is `cuda:0`.
    Cuda(usize),
    Metal,
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            "metal" | "mps" => Ok(Self::Metal),
            other => match other.strip_prefix("cuda:") {
                Some(ordinal) => ordinal.parse::<usize>().map(Self::Cuda).map_err(|_| {
                    anyhow::anyhow!(
                        "invalid device {s:?}: the GPU number after `cuda:` must be 0, 1, ..."
                    )
                }),
                None => bail!("invalid device {s:?}: expected auto, cpu, cuda, cuda:N or metal"),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
            Self::Metal => write!(f, "metal"),
        }
    }
}

/// Which GPU backends this binary was compiled with, e.g. `["cuda", "cudnn"]`.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut backends = Vec::new();
    if cfg!(feature = "cuda") {
        backends.push("cuda");
    }
    if cfg!(feature = "cudnn") {
        backends.push("cudnn");
    }
    if cfg!(feature = "metal") {
        backends.push("metal");
    }
    backends
}

/// Turn a `--device` choice into a candle device, or say why it cannot be had.
pub fn select_device(spec: &DeviceSpec) -> Result<Device> {
    match *spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => cuda_device(ordinal),
        DeviceSpec::Metal => metal_device(),
        DeviceSpec::Auto => {
            // Only ask the driver when a GPU could be used at all; a CPU-only build must not
            // pay for (or fail on) the probe.
            if cfg!(feature = "cuda") && cuda_device_count().is_ok_and(|n| n > 0) {
                cuda_device(0)
            } else {
                Ok(Device::Cpu)
            }
        }
    }
}

/// The device parity tests run on: `$SD_RS_TEST_DEVICE` (any `--device` value), else the CPU.
///
/// Tests that compare against diffusers' fixtures take their device from here, so that
/// scripts/gpu_test.sh can run the very same tests on a GPU with `SD_RS_TEST_DEVICE=cuda:0`.
pub fn test_device() -> Result<Device> {
    match std::env::var("SD_RS_TEST_DEVICE") {
        Ok(text) if !text.trim().is_empty() => {
            let spec: DeviceSpec = text.parse()?;
            select_device(&spec)
                .map_err(|e| e.context(format!("SD_RS_TEST_DEVICE={text} is not usable")))
        }
        _ => Ok(Device::Cpu),
    }
}

/// A one-line description for logs and benchmark headers, e.g.
/// `cuda:0 (NVIDIA H100 80GB HBM3, compute 9.0)` or `cpu (2 threads)`.
pub fn describe_device(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        Device::Cuda(_) => describe_cuda(device),
        Device::Metal(_) => "metal".to_string(),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device_count() -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    // The binary links libcuda.so.1 directly, so reaching this line means a driver library was
    // found; it can still be a stub or a driver without a usable GPU.
    let count = CudaContext::device_count()
        .map_err(|e| anyhow::anyhow!("the CUDA driver did not start ({e}): is a GPU visible?"))?;
    Ok(count.max(0) as usize)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device_count() -> Result<usize> {
    bail!(REBUILD_CUDA)
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    let count = cuda_device_count()
        .map_err(|e| anyhow::anyhow!("--device cuda:{ordinal}: {e} (or use --device cpu)"))?;
    if count == 0 {
        bail!("--device cuda:{ordinal}: the CUDA driver sees no GPU (use --device cpu)");
    }
    if ordinal >= count {
        bail!(
            "--device cuda:{ordinal}: this machine has {count} CUDA GPU(s), numbered 0 to {}",
            count - 1
        );
    }
    let device = Device::new_cuda(ordinal)
        .map_err(|e| anyhow::anyhow!("could not open CUDA GPU {ordinal}: {e}"))?;
    check_kernels_run_on(&device)?;
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device> {
    bail!(REBUILD_CUDA)
}

/// candle's CUDA kernels are compiled once, as PTX for the compute capability in
/// `CUDA_COMPUTE_CAP` at build time. On a GPU they cannot run on, the first kernel launch
/// fails deep inside candle with CUDA_ERROR_NO_BINARY_FOR_GPU; say it here instead.
#[cfg(feature = "cuda")]
fn check_kernels_run_on(device: &Device) -> Result<()> {
    let Some(built_for) = option_env!("CUDA_COMPUTE_CAP") else {
        // Built on a machine with a GPU: candle asked nvidia-smi, so it matches that GPU.
        return Ok(());
    };
    let ctx = device.as_cuda_device()?.cuda_stream().context().clone();
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| anyhow::anyhow!("could not read the GPU's compute capability: {e}"))?;
    let gpu = (major as usize) * 10 + minor as usize;
    if !kernels_run_on(built_for, gpu)? {
        bail!(
            "this sd-rs was built for CUDA compute capability {built_for} \
             (CUDA_COMPUTE_CAP) but GPU {} is {major}.{minor}; rebuild with \
             CUDA_COMPUTE_CAP={gpu} (see README, \"CUDA\")",
            device_ordinal(device)
        );
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn device_ordinal(device: &Device) -> usize {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
        _ => 0,
    }
}

#[cfg(feature = "cuda")]
fn describe_cuda(device: &Device) -> String {
    let ordinal = device_ordinal(device);
    let Ok(cuda) = device.as_cuda_device() else {
        return format!("cuda:{ordinal}");
    };
    let ctx = cuda.cuda_stream().context().clone();
    let name = ctx.name().unwrap_or_else(|_| "unknown GPU".to_string());
    match ctx.compute_capability() {
        Ok((major, minor)) => format!("cuda:{ordinal} ({name}, compute {major}.{minor})"),
        Err(_) => format!("cuda:{ordinal} ({name})"),
    }
}

#[cfg(not(feature = "cuda"))]
fn describe_cuda(_device: &Device) -> String {
    // A CPU-only build cannot hold a CUDA device; keep the match above total.
    "cuda".to_string()
}

/// Whether PTX built for `built_for` (a `CUDA_COMPUTE_CAP` value such as `90`, `90a`, `8.6`,
/// `sm_80`) runs on a GPU of compute capability `gpu` (major * 10 + minor, e.g. 90).
///
/// The rules are the PTX ones, with the suffix that candle's kernel builder (cudaforge) adds
/// when none is given: from 9.0 on it compiles arch-specific code (`90` means `sm_90a`), which
/// runs only on exactly that GPU generation; `f` (family) code runs on the same major version
/// at or above it; plain PTX is JIT-compiled by the driver for any newer GPU.
pub fn kernels_run_on(built_for: &str, gpu: usize) -> Result<bool> {
    let s = built_for.trim().to_ascii_lowercase();
    let s = s.strip_prefix("sm_").unwrap_or(&s);
    let (digits, suffix) = match s.strip_suffix('a') {
        Some(d) => (d, Some('a')),
        None => match s.strip_suffix('f') {
            Some(d) => (d, Some('f')),
            None => (s, None),
        },
    };
    let base: usize = match digits.split_once('.') {
        Some((major, minor)) => major.parse::<usize>()? * 10 + minor.parse::<usize>()?,
        None => digits
            .parse()
            .map_err(|_| anyhow::anyhow!("invalid compute capability {built_for:?}"))?,
    };
    let base = if base < 20 { base * 10 } else { base };
    let suffix = suffix.or(match base {
        120 => Some('a'),
        b if b > 120 => Some('f'),
        b if b >= 90 => Some('a'),
        _ => None,
    });
    Ok(match suffix {
        Some('a') => gpu == base,
        Some(_) => gpu / 10 == base / 10 && gpu >= base,
        None => gpu >= base,
    })
}

#[cfg(feature = "metal")]
fn metal_device() -> Result<Device> {
    Device::new_metal(0).map_err(|e| anyhow::anyhow!("could not open the Metal GPU: {e}"))
}

#[cfg(not(feature = "metal"))]
fn metal_device() -> Result<Device> {
    bail!(REBUILD_METAL)
}

/// The `--dtype` argument: the precision of weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DTypeSpec {
    /// f32 on the CPU and Metal, bf16 on CUDA (see [`resolve_dtype`]).
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl FromStr for DTypeSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => bail!("invalid dtype {s:?}: expected auto, f32, f16 or bf16"),
        }
    }
}

impl fmt::Display for DTypeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        };
        write!(f, "{name}")
    }
}

/// The dtype to compute in on `device`, or why the choice makes no sense there.
///
/// - `auto`: bf16 on CUDA (tensor-core speed like f16, with f32's exponent range, so the VAE
///   decoder cannot overflow to inf as it does in f16), f32 elsewhere.
/// - bf16 on the CPU is refused: candle 0.11's CPU conv2d has no bf16 kernel ("unsupported
///   dtype BF16 for op matmul" from inside the first convolution), so no U-Net or VAE runs.
/// - f16 on the CPU runs, with the warning from [`dtype_warning`]: it halves memory but is no
///   faster. Measured here (2 cores, candle 0.11.1), f16 against f32: matmul 1.2x slower,
///   3x3 conv2d the same, element-wise exp + sum 3.6x slower.
pub fn resolve_dtype(spec: DTypeSpec, device: &Device) -> Result<DType> {
    let dtype = match spec {
        DTypeSpec::Auto => match device {
            Device::Cuda(_) => DType::BF16,
            _ => DType::F32,
        },
        DTypeSpec::F32 => DType::F32,
        DTypeSpec::F16 => DType::F16,
        DTypeSpec::Bf16 => DType::BF16,
    };
    if device.is_cpu() && dtype == DType::BF16 {
        bail!(
            "--dtype bf16 does not work on the CPU: candle's CPU convolutions have no bf16              kernel; use --dtype f32 (the default), or f16 to halve memory"
        );
    }
    Ok(dtype)
}

/// `--dtype` as the commands use it: parse, resolve for `device`, and print the warning from
/// [`dtype_warning`] to stderr.
pub fn parse_dtype(text: &str, device: &Device) -> Result<DType> {
    let dtype = resolve_dtype(text.parse()?, device)?;
    if let Some(warning) = dtype_warning(device, dtype) {
        eprintln!("warning: {warning}");
    }
    Ok(dtype)
}

/// A warning worth printing before running in `dtype` on `device`, if any.
pub fn dtype_warning(device: &Device, dtype: DType) -> Option<String> {
    if device.is_cpu() && dtype == DType::F16 {
        return Some(
            "f16 on the CPU only saves memory: candle computes it more slowly than f32, and \
             the VAE decoder can overflow to inf in f16"
                .to_string(),
        );
    }
    None
}
