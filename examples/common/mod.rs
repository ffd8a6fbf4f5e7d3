//! What the op-timing examples share: their inputs and their command-line flags.
use anyhow::Result;
use candle_core::{Device, Tensor};

/// `sin(k i)` over `len` values: deterministic inputs that the PyTorch scripts make the same
/// way, so both print the same output means.
pub fn pattern(len: usize, k: f64) -> Result<Tensor> {
    Ok((Tensor::arange(0f32, len as f32, &Device::Cpu)? * k)?.sin()?)
}

/// The value after `flag` on the command line, if any.
pub fn flag_value(flag: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).cloned()
}

/// [`flag_value`] as a number.
pub fn flag_number(flag: &str) -> Option<usize> {
    flag_value(flag)?.parse().ok()
}
