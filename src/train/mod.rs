//! The reusable parts of `sd-rs train` and `sd-rs train-vae`.
//!
//! The training loop itself lives with the commands; this module holds the pieces it is made of,
//! each small enough to test on its own:
//! - [`optim`]: AdamW with state we can save (for `--resume`), gradient clipping and accumulation;
//! - [`ema`]: an exponential moving average of the weights, as diffusers' `EMAModel`;
//! - [`lr`]: learning-rate warmup and decay, as diffusers' `get_scheduler`;
//! - [`checkpoint`]: atomic, resumable training checkpoints;
//! - [`data`]: captioned images to tensors, a seeded resumable sampler and a background loader;
//! - [`latent_cache`]: each image encoded once by the frozen VAE and kept on disk;
//! - [`metrics`]: a JSON Lines metrics log, a smoothed loss and a NaN/Inf guard.
//!
//! This file also holds the two helpers they share: safetensors files with string metadata, and a
//! stable hash.
pub mod checkpoint;
pub mod data;
pub mod ema;
pub mod init;
pub mod latent_cache;
pub mod lr;
pub mod metrics;
pub mod optim;
pub mod vocab;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Writes `tensors` and string `metadata` to a safetensors file, atomically (a temporary file and
/// a rename), so a kill mid-write never leaves a torn file under `path`.
pub fn save_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    crate::io::with_atomic_file(path, |tmp| {
        // safetensors needs host memory; a tensor on the GPU is copied over here.
        let host: Vec<(&String, Tensor)> = tensors
            .iter()
            .map(|(name, t)| Ok((name, t.to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<Result<_>>()?;
        let metadata = (!metadata.is_empty()).then_some(metadata);
        safetensors::serialize_to_file(host, metadata, tmp)
            .with_context(|| format!("writing {}", tmp.display()))
    })
}

/// Reads every tensor of a safetensors file onto `device`, with the file's string metadata.
pub fn load_safetensors(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .with_context(|| format!("loading tensors from {}", path.display()))?;
    Ok((tensors, metadata))
}

/// Reads one metadata value and parses it, naming the file and key when it is missing or bad.
pub(crate) fn parse_metadata<T: std::str::FromStr>(
    metadata: &HashMap<String, String>,
    key: &str,
    path: &Path,
) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    let raw = metadata
        .get(key)
        .with_context(|| format!("{}: metadata has no \"{key}\"", path.display()))?;
    raw.parse()
        .map_err(|e| anyhow::anyhow!("{}: metadata \"{key}\" = {raw:?}: {e}", path.display()))
}

/// 64-bit FNV-1a: a hash whose value never changes between Rust versions or platforms (std's
/// `DefaultHasher` gives no such promise), so it can name files that outlive one build. It is not
/// cryptographic; it keys caches, where a collision costs at most one stale entry.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }

    /// Hashes a length-prefixed field, so ("ab", "c") and ("a", "bc") differ.
    pub fn field(&mut self, bytes: &[u8]) -> &mut Self {
        self.update(&(bytes.len() as u64).to_le_bytes())
            .update(bytes)
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// Mixes a seed and two counters into an independent-looking 64-bit seed (SplitMix64's
/// finaliser). Every random choice made for one sample is seeded from (run seed, epoch, position),
/// so a resumed run, or a loader thread working ahead, makes exactly the same choices.
pub fn mix_seed(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed;
    for v in [a, b] {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_add(v);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
    }
    z
}

/// Standard normal noise of `shape` drawn on the host from `rng`, then moved to `device`. Training
/// noise comes from the run's own seeded RNG (saved in checkpoints) rather than the device's
/// generator, so a run is reproducible and resumable on any device.
pub fn randn(
    rng: &mut rand_chacha::ChaCha8Rng,
    shape: impl Into<candle_core::Shape>,
    device: &Device,
) -> Result<Tensor> {
    use rand::Rng;
    let shape = shape.into();
    let values: Vec<f32> = (0..shape.elem_count())
        .map(|_| rng.sample(rand_distr::StandardNormal))
        .collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_known_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(Fnv1a::new().finish(), 0xcbf29ce484222325);
        assert_eq!(Fnv1a::new().update(b"a").finish(), 0xaf63dc4c8601ec8c);
        assert_eq!(Fnv1a::new().update(b"foobar").finish(), 0x85944171f73967e8);
        let ab_c = Fnv1a::new().field(b"ab").field(b"c").finish();
        let a_bc = Fnv1a::new().field(b"a").field(b"bc").finish();
        assert_ne!(ab_c, a_bc);
    }
}
