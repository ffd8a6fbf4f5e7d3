//! Latents cached on disk: each training image goes through the frozen VAE encoder once, and
//! later epochs and later runs read the stored result instead.
//!
//! An entry is a safetensors file `DIR/ab/abcdef0123456789.safetensors` named by a 64-bit FNV-1a
//! hash of everything that decides the encoder's output:
//! - the image file's bytes (not its path or mtime: a copied or touched file still hits, an
//!   edited one misses);
//! - the preprocessing: resolution, crop, whether flipped copies are stored;
//! - the encoder's identity, a string the caller builds: [`file_identity`] of the VAE's weights
//!   and config.json (hashing the bytes costs about 2 s per GB here, once per run, and unlike
//!   size+mtime it cannot be fooled by a re-download or a fine-tune of the same shape), plus
//!   anything else that changes its output, such as the dtype it runs in.
//!
//! What is stored is whatever `encode` returns, kept on the CPU in f32. Store the encoder's
//! moments (mean and log-variance, diffusers' `latent_dist.parameters`) and draw a fresh latent
//! each step with [`sample_latent`]: training then sees exactly what it would see uncached.
//!
//! Augmentations: a random crop changes the pixels every epoch, so it cannot be cached and is
//! refused (kohya's scripts refuse it too). A random flip is kept exact by storing the latents of
//! both the image and its mirror image ("latent" and "latent_flipped"), at twice the encoding
//! time and disk; flipping a latent instead is only approximately the latent of the flipped image.
use crate::io::captions::CaptionedImage;
use crate::train::data::{CropMode, ImageTransform, LoadFn, SkippedSample};
use crate::train::{load_safetensors, save_safetensors, Fnv1a};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Everything besides the image itself that decides a cached latent.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CacheSettings {
    pub resolution: u32,
    pub crop: CropMode,
    /// Store the latent of the mirrored image too, for random-flip training.
    pub flip: bool,
    /// Names the encoder and how it runs, e.g. `format!("{} f32", file_identity(&[..])?)`.
    pub encoder_id: String,
}

pub struct LatentCache {
    dir: PathBuf,
    settings: CacheSettings,
}

/// What [`LatentCache::prepare`] did.
#[derive(Debug, Default)]
pub struct PrepareReport {
    /// The cache entry of each dataset item, `None` for items whose image could not be read.
    pub entries: Vec<Option<PathBuf>>,
    /// Images encoded now.
    pub encoded: usize,
    /// Images found in the cache.
    pub reused: usize,
    pub skipped: Vec<SkippedSample>,
}

/// An image waiting for the encoder.
struct Pending {
    item: usize,
    source: PathBuf,
    entry: PathBuf,
    pixels: Tensor,
}

impl LatentCache {
    pub fn open(dir: &Path, settings: CacheSettings) -> Result<Self> {
        if settings.crop == CropMode::Random {
            bail!(
                "a random crop changes the image every epoch, so its latents cannot be cached: \
                 use a center crop with the latent cache, or turn the cache off"
            );
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating latent cache directory {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            settings,
        })
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// Where the entry for an image with these bytes lives.
    pub fn entry_path(&self, image_bytes: &[u8]) -> PathBuf {
        let s = &self.settings;
        let mut hash = Fnv1a::new();
        hash.field(b"sd-rs latent cache v1")
            .field(&s.resolution.to_le_bytes())
            .field(
                serde_json::to_string(&s.crop)
                    .unwrap_or_default()
                    .as_bytes(),
            )
            .field(&[s.flip as u8])
            .field(s.encoder_id.as_bytes())
            .field(image_bytes);
        let key = format!("{:016x}", hash.finish());
        self.dir.join(&key[..2]).join(format!("{key}.safetensors"))
    }

    /// Makes sure every item has a cache entry, encoding the missing ones `batch_size` images at a
    /// time. `encode` gets (B, 3, H, W) f32 pixels in [-1, 1] on the CPU (it moves them to its
    /// device and dtype) and returns one result per image along the first dimension. Unreadable
    /// images are skipped and listed, or stop the run when `strict`. `progress(done, total)` is
    /// called after each item.
    pub fn prepare(
        &self,
        items: &[CaptionedImage],
        batch_size: usize,
        strict: bool,
        mut encode: impl FnMut(&Tensor) -> Result<Tensor>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<PrepareReport> {
        ensure!(batch_size > 0, "encode batch size must be at least 1");
        let transform = ImageTransform {
            resolution: self.settings.resolution,
            crop: self.settings.crop,
            random_flip: false,
        };
        let mut report = PrepareReport {
            entries: vec![None; items.len()],
            ..Default::default()
        };
        let mut pending: Vec<Pending> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let prepared = std::fs::read(&item.path)
                .with_context(|| format!("reading image {}", item.path.display()))
                .and_then(|bytes| {
                    let entry = self.entry_path(&bytes);
                    if self.is_valid_entry(&entry) {
                        return Ok((entry, None));
                    }
                    // A center crop draws nothing from the RNG.
                    let mut unused = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
                    let rgb = transform.rgb_from_bytes(&bytes, &item.path, &mut unused)?;
                    Ok((entry, Some(crate::train::data::rgb_to_tensor(&rgb)?)))
                });
            match prepared {
                Ok((entry, None)) => {
                    report.reused += 1;
                    report.entries[i] = Some(entry);
                }
                Ok((entry, Some(pixels))) => pending.push(Pending {
                    item: i,
                    source: item.path.clone(),
                    entry,
                    pixels,
                }),
                Err(e) if strict => return Err(e.context("unreadable image (strict mode)")),
                Err(e) => report.skipped.push(SkippedSample {
                    path: item.path.clone(),
                    error: format!("{e:#}"),
                }),
            }
            if pending.len() == batch_size || (i + 1 == items.len() && !pending.is_empty()) {
                for done in self.encode_batch(std::mem::take(&mut pending), &mut encode)? {
                    report.encoded += 1;
                    report.entries[done.0] = Some(done.1);
                }
            }
            progress(i + 1, items.len());
        }
        Ok(report)
    }

    fn encode_batch(
        &self,
        batch: Vec<Pending>,
        encode: &mut impl FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Vec<(usize, PathBuf)>> {
        let n = batch.len();
        let pixels: Vec<Tensor> = batch.iter().map(|p| p.pixels.clone()).collect();
        let mut input = Tensor::stack(&pixels, 0)?;
        if self.settings.flip {
            // The mirrored images ride in the same encoder call, after the originals.
            input = Tensor::cat(&[&input, &input.flip(&[3])?], 0)?;
        }
        let output = encode(&input)?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        ensure!(
            output.dim(0)? == input.dim(0)?,
            "the encoder returned {} results for {} images",
            output.dim(0)?,
            input.dim(0)?
        );
        let mut written = Vec::with_capacity(n);
        for (k, p) in batch.into_iter().enumerate() {
            let mut tensors = HashMap::from([("latent".to_string(), output.get(k)?.contiguous()?)]);
            if self.settings.flip {
                tensors.insert(
                    "latent_flipped".to_string(),
                    output.get(n + k)?.contiguous()?,
                );
            }
            let metadata = HashMap::from([
                (
                    "settings".to_string(),
                    serde_json::to_string(&self.settings)?,
                ),
                ("source".to_string(), p.source.display().to_string()),
            ]);
            save_safetensors(&p.entry, &tensors, metadata)?;
            written.push((p.item, p.entry));
        }
        Ok(written)
    }

    /// Whether an entry exists and holds what these settings need. A file that does not parse
    /// (say, truncated by a full disk) is treated as missing and re-encoded.
    fn is_valid_entry(&self, entry: &Path) -> bool {
        let Ok(bytes) = std::fs::read(entry) else {
            return false;
        };
        let Ok(file) = safetensors::SafeTensors::deserialize(&bytes) else {
            return false;
        };
        let names = file.names();
        names.contains(&"latent") && (!self.settings.flip || names.contains(&"latent_flipped"))
    }

    /// Reads an entry's latent (or, with `flipped`, its mirror image's) onto the CPU.
    pub fn load(entry: &Path, flipped: bool) -> Result<Tensor> {
        let (mut tensors, _) = load_safetensors(entry, &Device::Cpu)?;
        let name = if flipped { "latent_flipped" } else { "latent" };
        tensors
            .remove(name)
            .with_context(|| format!("latent cache entry {} has no {name}", entry.display()))
    }

    /// A [`LoadFn`] for the data loader that reads item i's entry from `entries` (from
    /// [`LatentCache::prepare`]), the mirrored one half of the time when `random_flip`.
    pub fn loader(entries: Vec<Option<PathBuf>>, random_flip: bool) -> LoadFn {
        let entries = Arc::new(entries);
        Arc::new(
            move |item: &CaptionedImage, i: usize, rng: &mut ChaCha8Rng| {
                let Some(entry) = entries.get(i).cloned().flatten() else {
                    bail!(
                        "image {} was unreadable when the latent cache was built",
                        item.path.display()
                    )
                };
                let flipped = random_flip && rand::RngCore::next_u64(rng) >> 63 == 1;
                Self::load(&entry, flipped)
            },
        )
    }
}

/// A stable identity for files, e.g. a VAE's weights and config: FNV-1a over each file's name,
/// length and bytes, read in 1 MiB blocks.
pub fn file_identity(paths: &[&Path]) -> Result<String> {
    let mut hash = Fnv1a::new();
    let mut buffer = vec![0u8; 1 << 20];
    for path in paths {
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("opening {} to identify it", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        hash.field(name.as_bytes())
            .update(&file.metadata()?.len().to_le_bytes());
        loop {
            let n = file
                .read(&mut buffer)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            hash.update(&buffer[..n]);
        }
    }
    Ok(format!("fnv1a64:{:016x}", hash.finish()))
}

/// A latent drawn from cached encoder moments (mean and log-variance concatenated on the channel
/// dimension, dims (.., 2C, H, W)), as diffusers' `DiagonalGaussianDistribution.sample()`:
/// `mean + exp(logvar / 2) * eps`, with the log-variance clamped to [-30, 20]. Scale the result by
/// the VAE's `scaling_factor` (and shift) as usual.
pub fn sample_latent(moments: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let channel_dim = moments
        .rank()
        .checked_sub(3)
        .context("moments need (.., 2C, H, W)")?;
    let parts = moments.chunk(2, channel_dim)?;
    let (mean, logvar) = (&parts[0], parts[1].clamp(-30f32, 20f32)?);
    let std = (logvar * 0.5)?.exp()?;
    let eps = crate::train::randn(rng, mean.shape(), mean.device())?.to_dtype(mean.dtype())?;
    Ok((mean + (std * eps)?)?)
}
