//! Training data: captioned images to tensors, in a seeded order that a resumed run repeats, made
//! ahead of time on a background thread.
//!
//! - [`ImageTransform`]: decode, resize the shorter side to the resolution, center or random
//!   crop, optional random horizontal flip, CHW f32 in [-1, 1] (diffusers' train_text_to_image
//!   transforms: Resize(bilinear), CenterCrop/RandomCrop, RandomHorizontalFlip, Normalize(0.5)).
//! - [`EpochSampler`]: a fresh permutation each epoch, a pure function of (seed, epoch).
//! - [`Batcher`]: batches of samples and captions with caption dropout, skipping (and reporting)
//!   unreadable images, or stopping on the first one in strict mode.
//! - [`Loader`]: a [`Batcher`] on its own thread with a bounded queue, so the device never waits.
//!
//! Every random choice for one sample (crop, flip, caption dropout) comes from an RNG seeded by
//! (run seed, epoch, position in the epoch), not from one RNG threaded through the run. So the
//! loader can work ahead, in parallel, and a resumed run replays exactly the same samples from
//! its saved [`DataPosition`] alone.
use crate::io::captions::CaptionedImage;
use crate::train::mix_seed;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::RgbImage;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

// ---------------------------------------------------------------------------------------------
// Images to tensors

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CropMode {
    Center,
    Random,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageTransform {
    /// Side of the square training images, in pixels.
    pub resolution: u32,
    pub crop: CropMode,
    pub random_flip: bool,
}

impl ImageTransform {
    /// The sample tensor (3, resolution, resolution), f32 in [-1, 1], on the CPU. `rng` decides
    /// the crop (first) and the flip (second).
    pub fn load(&self, path: &Path, rng: &mut impl RngCore) -> Result<Tensor> {
        let image = self.load_rgb(path, rng)?;
        let flip = self.random_flip && coin(rng);
        rgb_to_tensor(&if flip {
            image::imageops::flip_horizontal(&image)
        } else {
            image
        })
    }

    /// The resized and cropped image, not flipped.
    pub fn load_rgb(&self, path: &Path, rng: &mut impl RngCore) -> Result<RgbImage> {
        let bytes =
            std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
        self.rgb_from_bytes(&bytes, path, rng)
    }

    /// As [`ImageTransform::load_rgb`], from the file's bytes (`path` only names it in errors).
    pub fn rgb_from_bytes(
        &self,
        bytes: &[u8],
        path: &Path,
        rng: &mut impl RngCore,
    ) -> Result<RgbImage> {
        let image = image::ImageReader::new(std::io::Cursor::new(bytes))
            // Trust the bytes, not the extension: a .png that is a JPEG still loads.
            .with_guessed_format()
            .with_context(|| format!("reading image {}", path.display()))?
            .decode()
            .with_context(|| format!("decoding image {}", path.display()))?;
        Ok(resize_and_crop(
            &image.to_rgb8(),
            self.resolution,
            self.crop,
            rng,
        ))
    }
}

/// Scales `image` so its shorter side is `resolution` (the longer one rounded down, as
/// torchvision's Resize), then crops a `resolution`-pixel square: centered (an odd margin split
/// with Python's round-half-to-even, as torchvision's CenterCrop) or at a random offset.
pub fn resize_and_crop(
    image: &RgbImage,
    resolution: u32,
    crop: CropMode,
    rng: &mut impl RngCore,
) -> RgbImage {
    let (w, h) = image.dimensions();
    let (new_w, new_h) = if w <= h {
        (resolution, (resolution as u64 * h as u64 / w as u64) as u32)
    } else {
        ((resolution as u64 * w as u64 / h as u64) as u32, resolution)
    };
    // Triangle is a bilinear filter whose support widens when shrinking, which antialiases like
    // PIL's bilinear resize (what torchvision applies to PIL images).
    let resized = if (new_w, new_h) == (w, h) {
        image.clone()
    } else {
        image::imageops::resize(image, new_w, new_h, FilterType::Triangle)
    };
    let (left, top) = match crop {
        CropMode::Center => (
            center_offset(new_w - resolution),
            center_offset(new_h - resolution),
        ),
        CropMode::Random => (
            uniform_below(rng, new_w - resolution + 1),
            uniform_below(rng, new_h - resolution + 1),
        ),
    };
    image::imageops::crop_imm(&resized, left, top, resolution, resolution).to_image()
}

/// round(margin / 2) with ties to even, as torchvision's `int(round((h - th) / 2.0))`.
fn center_offset(margin: u32) -> u32 {
    let half = margin / 2;
    if margin % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// An RGB image as a (3, H, W) f32 tensor in [-1, 1] on the CPU.
pub fn rgb_to_tensor(image: &RgbImage) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    let plane = (w * h) as usize;
    let mut chw = vec![0f32; 3 * plane];
    for (i, pixel) in image.pixels().enumerate() {
        for c in 0..3 {
            chw[c * plane + i] = pixel.0[c] as f32 / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_vec(
        chw,
        (3, h as usize, w as usize),
        &Device::Cpu,
    )?)
}

// ---------------------------------------------------------------------------------------------
// Seeded randomness

/// Independent random streams drawn for each sample and each epoch.
#[derive(Clone, Copy)]
enum Stream {
    Shuffle = 0,
    Sample = 1,
    Caption = 2,
}

fn rng_for(seed: u64, epoch: u64, index: u64, stream: Stream) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, epoch, index));
    rng.set_stream(stream as u64);
    rng
}

/// A uniform integer in [0, n): the high half of a 64x64-bit product (Lemire), whose bias
/// (at most n / 2^64) is far below anything observable, and whose values never change with the
/// `rand` crate's version.
pub fn uniform_below(rng: &mut impl RngCore, n: u32) -> u32 {
    ((rng.next_u64() as u128 * n as u128) >> 64) as u32
}

/// A uniform f64 in [0, 1) from 53 random bits.
pub fn unit_f64(rng: &mut impl RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn coin(rng: &mut impl RngCore) -> bool {
    rng.next_u64() >> 63 == 1
}

// ---------------------------------------------------------------------------------------------
// Order

/// Where a run is in its data: `index` samples of epoch `epoch`'s order have been used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub index: usize,
}

/// Each epoch visits every sample once, in a permutation that depends only on (seed, epoch).
#[derive(Debug, Clone)]
pub struct EpochSampler {
    len: usize,
    seed: u64,
}

impl EpochSampler {
    pub fn new(len: usize, seed: u64) -> Self {
        Self { len, seed }
    }

    /// The order of epoch `epoch`: a Fisher-Yates shuffle of 0..len.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        shuffle(
            &mut order,
            &mut rng_for(self.seed, epoch, 0, Stream::Shuffle),
        );
        order
    }
}

/// Fisher-Yates shuffle of `items` in place.
fn shuffle<T>(items: &mut [T], rng: &mut impl RngCore) {
    for i in (1..items.len()).rev() {
        items.swap(i, uniform_below(rng, i as u32 + 1) as usize);
    }
}

// ---------------------------------------------------------------------------------------------
// Batches

/// Makes one sample tensor from item `index` of the dataset with that sample's RNG; e.g. an
/// [`ImageTransform`] on the item's path, or a cached latent (see `latent_cache`).
pub type LoadFn =
    Arc<dyn Fn(&CaptionedImage, usize, &mut ChaCha8Rng) -> Result<Tensor> + Send + Sync>;

/// A [`LoadFn`] that loads the item's image with `transform`.
pub fn image_loader(transform: ImageTransform) -> LoadFn {
    Arc::new(move |item: &CaptionedImage, _, rng: &mut ChaCha8Rng| transform.load(&item.path, rng))
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchConfig {
    pub batch_size: usize,
    pub seed: u64,
    /// Probability of training a sample on the empty caption, which teaches the unconditional
    /// prediction that classifier-free guidance needs.
    pub caption_dropout: f64,
    /// Probability of leaving out each comma-separated tag of a caption after the first
    /// `caption_keep_tags` (kohya's `caption_tag_dropout_rate` and `keep_tokens`). Captions that
    /// always list every attribute teach nothing about prompts that name only some; with this,
    /// "anime girl, red hair, glasses" is a caption the model has seen.
    pub caption_tag_dropout: f64,
    pub caption_keep_tags: usize,
    /// Shuffle the tags after the first `caption_keep_tags` each time a caption is used
    /// (kohya's `shuffle_caption`). A causal text encoder reads a tag in the light of the tags
    /// before it, so captions that always list their tags in one order teach a tag only in that
    /// company, and a prompt that orders them otherwise is out of the training distribution.
    pub caption_shuffle_tags: bool,
    /// Stop at the first unreadable image instead of skipping it.
    pub strict: bool,
}

impl BatchConfig {
    /// Batches whose captions are used as written and never dropped (images only, as the VAE
    /// trains); set the caption fields on top of this where they matter.
    pub fn plain(batch_size: usize, seed: u64, strict: bool) -> Self {
        Self {
            batch_size,
            seed,
            caption_dropout: 0.0,
            caption_tag_dropout: 0.0,
            caption_keep_tags: 0,
            caption_shuffle_tags: false,
            strict,
        }
    }
}

/// `caption` with each tag after the first `keep` left out with probability `rate`; the order
/// of the others is kept. With `rate` 0 the caption comes back unchanged.
pub fn drop_tags(caption: &str, rate: f64, keep: usize, rng: &mut impl RngCore) -> String {
    if rate <= 0.0 {
        return caption.to_string();
    }
    let kept: Vec<&str> = tags(caption)
        .enumerate()
        .filter(|&(i, _)| i < keep || unit_f64(rng) >= rate)
        .map(|(_, tag)| tag)
        .collect();
    kept.join(", ")
}

/// `caption` with its tags after the first `keep` in a random order.
pub fn shuffle_tags(caption: &str, keep: usize, rng: &mut impl RngCore) -> String {
    let mut tags: Vec<&str> = tags(caption).collect();
    let start = keep.min(tags.len());
    shuffle(&mut tags[start..], rng);
    tags.join(", ")
}

/// The comma-separated tags of a caption, trimmed, empty ones left out.
fn tags(caption: &str) -> impl Iterator<Item = &str> {
    caption
        .split(',')
        .map(str::trim)
        .filter(|tag| !tag.is_empty())
}

/// An image that could not be used, with why.
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedSample {
    pub path: PathBuf,
    pub error: String,
}

#[derive(Debug)]
pub struct Batch {
    /// The samples stacked on a new first dimension, on the CPU.
    pub samples: Tensor,
    /// One caption per sample, "" where dropped.
    pub captions: Vec<String>,
    /// Dataset indices of the samples.
    pub indices: Vec<usize>,
    /// The data position after this batch: save it in a checkpoint taken after training on it.
    pub next: DataPosition,
    /// Images found unreadable while making this batch (each reported once per run).
    pub skipped: Vec<SkippedSample>,
}

/// Makes batches in the sampler's order from a position. Batches run on across epoch ends.
pub struct Batcher {
    items: Arc<Vec<CaptionedImage>>,
    load: LoadFn,
    config: BatchConfig,
    sampler: EpochSampler,
    position: DataPosition,
    order: Vec<usize>,
    /// Items known to be unreadable, skipped without another try.
    bad: HashSet<usize>,
}

impl Batcher {
    pub fn new(
        items: Arc<Vec<CaptionedImage>>,
        load: LoadFn,
        config: BatchConfig,
        start: DataPosition,
    ) -> Result<Self> {
        ensure!(!items.is_empty(), "the dataset is empty");
        ensure!(config.batch_size > 0, "batch size must be at least 1");
        ensure!(
            start.index <= items.len(),
            "data position {start:?} is past the end of a {}-sample dataset (did the dataset change?)",
            items.len()
        );
        let sampler = EpochSampler::new(items.len(), config.seed);
        let order = sampler.order(start.epoch);
        Ok(Self {
            items,
            load,
            config,
            sampler,
            position: start,
            order,
            bad: HashSet::new(),
        })
    }

    pub fn position(&self) -> DataPosition {
        self.position
    }

    /// The next `(position, dataset index)` in the order, moving to the next epoch at the end.
    fn advance(&mut self) -> (DataPosition, usize) {
        if self.position.index == self.order.len() {
            self.position = DataPosition {
                epoch: self.position.epoch + 1,
                index: 0,
            };
            self.order = self.sampler.order(self.position.epoch);
        }
        let at = self.position;
        self.position.index += 1;
        (at, self.order[at.index])
    }

    pub fn next_batch(&mut self) -> Result<Batch> {
        let (batch_size, seed) = (self.config.batch_size, self.config.seed);
        let mut samples = Vec::with_capacity(batch_size);
        let mut captions = Vec::with_capacity(batch_size);
        let mut indices = Vec::with_capacity(batch_size);
        let mut skipped = Vec::new();
        // Fail rather than loop forever when nothing can be read.
        let mut failures_in_a_row = 0;
        while samples.len() < batch_size {
            let mut wanted = Vec::new();
            while wanted.len() < batch_size - samples.len() {
                let (at, index) = self.advance();
                if !self.bad.contains(&index) {
                    wanted.push((at, index));
                } else if self.bad.len() == self.items.len() {
                    bail!(
                        "none of the {} images of the dataset could be read",
                        self.items.len()
                    );
                }
            }
            // Decode in parallel; results come back in order, so batches stay deterministic.
            let loaded: Vec<Result<Tensor>> = wanted
                .par_iter()
                .map(|&(at, index)| {
                    let mut rng = rng_for(seed, at.epoch, at.index as u64, Stream::Sample);
                    (self.load)(&self.items[index], index, &mut rng)
                })
                .collect();
            for ((at, index), result) in wanted.into_iter().zip(loaded) {
                let item = &self.items[index];
                match result {
                    Ok(sample) => {
                        failures_in_a_row = 0;
                        let mut rng = rng_for(seed, at.epoch, at.index as u64, Stream::Caption);
                        let drop = unit_f64(&mut rng) < self.config.caption_dropout;
                        captions.push(if drop {
                            String::new()
                        } else {
                            let (rate, keep) = (
                                self.config.caption_tag_dropout,
                                self.config.caption_keep_tags,
                            );
                            let caption = drop_tags(&item.caption, rate, keep, &mut rng);
                            if self.config.caption_shuffle_tags {
                                shuffle_tags(&caption, keep, &mut rng)
                            } else {
                                caption
                            }
                        });
                        samples.push(sample);
                        indices.push(index);
                    }
                    Err(e) if self.config.strict => {
                        return Err(e.context(format!(
                            "unreadable image {} (strict mode)",
                            item.path.display()
                        )));
                    }
                    Err(e) => {
                        failures_in_a_row += 1;
                        // A batch running across an epoch end can hold the same item twice.
                        if self.bad.insert(index) {
                            skipped.push(SkippedSample {
                                path: item.path.clone(),
                                error: format!("{e:#}"),
                            });
                        }
                        if failures_in_a_row >= self.items.len() {
                            bail!(
                                "none of the {} images of the dataset could be read",
                                self.items.len()
                            );
                        }
                    }
                }
            }
        }
        let samples =
            Tensor::stack(&samples, 0).context("stacking samples (do they differ in shape?)")?;
        Ok(Batch {
            samples,
            captions,
            indices,
            next: self.position,
            skipped,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Background loading

/// A [`Batcher`] running on its own thread, `prefetch` batches ahead of the training loop.
/// Dropping the loader stops the thread.
pub struct Loader {
    receiver: Option<Receiver<Result<Batch>>>,
    thread: Option<JoinHandle<()>>,
}

impl Loader {
    pub fn spawn(mut batcher: Batcher, prefetch: usize) -> Result<Self> {
        // A bounded queue: the thread blocks once `prefetch` batches wait, so memory stays flat.
        let (sender, receiver) = sync_channel(prefetch.max(1));
        let thread = std::thread::Builder::new()
            .name("sd-rs data loader".into())
            .spawn(move || loop {
                let batch = batcher.next_batch();
                let failed = batch.is_err();
                // A send error means the loader was dropped: stop quietly.
                if sender.send(batch).is_err() || failed {
                    break;
                }
            })
            .context("starting the data loader thread")?;
        Ok(Self {
            receiver: Some(receiver),
            thread: Some(thread),
        })
    }

    /// The next batch, waiting for it if the thread has not made it yet.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let receiver = self
            .receiver
            .as_ref()
            .context("data loader already stopped")?;
        match receiver.recv() {
            Ok(batch) => batch,
            Err(_) => bail!("the data loader thread stopped (it panicked or hit an earlier error)"),
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the queue first wakes a thread blocked on a full queue, so the join returns.
        drop(self.receiver.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
