//! Where samplers get their random numbers.
//!
//! Every random draw of a sampling run (the initial latents and the noise of stochastic steps)
//! goes through a [`NoiseSource`], so a run is reproducible from a seed and tests can replay
//! noise recorded from diffusers.

use std::collections::VecDeque;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A source of standard normal noise.
pub trait NoiseSource {
    /// A tensor of i.i.d. N(0, 1) samples with the given shape, dtype and device.
    fn sample(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;
}

/// Seeded noise: ChaCha8 streams and a standard normal, drawn on the CPU in f32 and only then
/// converted and moved, so the same seed gives the same numbers on every device and dtype.
///
/// With [`SeededNoise::new`] one stream fills whole tensors. With [`SeededNoise::per_sample`]
/// each sample along dimension 0 has its own stream, so image i of a batch made with seeds
/// `[s, s+1, ...]` is identical to the same image generated alone with `SeededNoise::new(s + i)`.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    streams: Vec<ChaCha8Rng>,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            streams: vec![ChaCha8Rng::seed_from_u64(seed)],
        }
    }

    /// One stream per sample (dimension 0 of every requested shape must equal `seeds.len()`).
    pub fn per_sample(seeds: &[u64]) -> Self {
        Self {
            streams: seeds
                .iter()
                .map(|&s| ChaCha8Rng::seed_from_u64(s))
                .collect(),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn sample(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let count: usize = shape.iter().product();
        let mut values = Vec::with_capacity(count);
        if self.streams.len() == 1 {
            let rng = &mut self.streams[0];
            values.extend((0..count).map(|_| -> f32 { StandardNormal.sample(rng) }));
        } else {
            if shape.first() != Some(&self.streams.len()) {
                bail!(
                    "per-sample noise has {} seeds but the requested shape is {shape:?}",
                    self.streams.len()
                );
            }
            let per = count / self.streams.len();
            for rng in self.streams.iter_mut() {
                values.extend((0..per).map(|_| -> f32 { StandardNormal.sample(rng) }));
            }
        }
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }
}

/// Replays given tensors in order (for tests against noise recorded elsewhere). Asking for more
/// draws than were given, or for a different shape, is an error.
#[derive(Debug, Clone, Default)]
pub struct ReplayNoise {
    queue: VecDeque<Tensor>,
    drawn: usize,
}

impl ReplayNoise {
    pub fn new(tensors: impl IntoIterator<Item = Tensor>) -> Self {
        Self {
            queue: tensors.into_iter().collect(),
            drawn: 0,
        }
    }

    /// How many tensors have been handed out.
    pub fn drawn(&self) -> usize {
        self.drawn
    }

    /// How many tensors are left.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

impl NoiseSource for ReplayNoise {
    fn sample(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let Some(next) = self.queue.pop_front() else {
            bail!(
                "replayed noise exhausted after {} draws (asked for {shape:?})",
                self.drawn
            );
        };
        if next.dims() != shape {
            bail!(
                "replayed noise draw {} has shape {:?}, asked for {shape:?}",
                self.drawn,
                next.dims()
            );
        }
        self.drawn += 1;
        Ok(next.to_dtype(dtype)?.to_device(device)?)
    }
}
