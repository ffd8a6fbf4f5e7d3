//! Samplers: the reverse process, one file per sampler behind the [`Sampler`] trait.
//!
//! Each sampler mirrors a diffusers scheduler class exactly (same timesteps, sigmas and update,
//! including diffusers' quirks, so that a seed and a config give diffusers' numbers):
//!
//! | [`SamplerKind`] | A1111 name | diffusers class |
//! |---|---|---|
//! | `Ddpm` | DDPM | `DDPMScheduler` |
//! | `Ddim` | DDIM | `DDIMScheduler` (eta 0) |
//! | `Euler` | Euler | `EulerDiscreteScheduler` |
//! | `EulerAncestral` | Euler a | `EulerAncestralDiscreteScheduler` |
//! | `DpmPlusPlus2M` | DPM++ 2M | `DPMSolverMultistepScheduler` (dpmsolver++, order 2) |
//! | `DpmPlusPlus2MKarras` | DPM++ 2M Karras | the same with `use_karras_sigmas=True` |
//!
//! A sampling loop (classifier-free guidance left out):
//!
//! ```ignore
//! let mut sampler = build_sampler(kind, &config, steps)?;
//! let mut noise = SeededNoise::new(seed);
//! let mut x = (noise.sample(&[1, 4, h / 8, w / 8], DType::F32, &device)? * sampler.init_noise_sigma())?;
//! for (i, &t) in sampler.timesteps().to_vec().iter().enumerate() {
//!     let model_in = sampler.scale_model_input(&x, i)?;
//!     let out = unet.forward(&model_in, t, &context)?;
//!     x = sampler.step(&out, i, &x, &mut noise)?;
//! }
//! ```
//! For img2img start at `i0 = img2img_start_index(steps, strength)` with
//! `x = sampler.add_noise(&z0, &noise, i0)` and loop over the steps from `i0` on.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use candle_core::Tensor;

use crate::schedule::SchedulerConfig;

pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod noise;
pub mod spacing;

pub use ddim::DdimSampler;
pub use ddpm::DdpmSampler;
pub use dpm_solver::DpmSolverMultistepSampler;
pub use euler::EulerSampler;
pub use euler_ancestral::EulerAncestralSampler;
pub use noise::{NoiseSource, ReplayNoise, SeededNoise};

/// One sampling run of a diffusion sampler over a fixed list of timesteps.
///
/// Steps are addressed by their index into [`Sampler::timesteps`], and must be taken in order
/// (multistep samplers remember the previous step; [`Sampler::reset`] starts over). Tensors may
/// be of any float dtype and device: the update is computed in f32 and returned in the dtype of
/// `model_output`, as diffusers upcasts.
pub trait Sampler: Send {
    /// The timesteps to give the model, in order of use (fractional for Euler with "linspace").
    fn timesteps(&self) -> &[f64];

    /// Standard deviation of the initial noise: multiply N(0, I) latents by it (1 for the
    /// variance-preserving samplers, the largest sigma for Euler).
    fn init_noise_sigma(&self) -> f64;

    /// The model input for step `step_index` (Euler divides by sqrt(sigma^2 + 1)).
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor>;

    /// One reverse step from the model output at step `step_index`; draws noise from `noise`
    /// when the sampler is stochastic (DDPM, DDIM with eta > 0, Euler a).
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;

    /// Noises clean latents to the level of step `step_index` (the img2img starting point).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;

    /// The x0 prediction made by the last `step` (after any clipping), e.g. to show progress.
    fn predicted_original(&self) -> Option<&Tensor>;

    /// Forgets the state of the previous run (the multistep history, the last x0).
    fn reset(&mut self);
}

/// The samplers on offer, named as in AUTOMATIC1111.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    Ddpm,
    Ddim,
    Euler,
    EulerAncestral,
    DpmPlusPlus2M,
    DpmPlusPlus2MKarras,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 6] = [
        SamplerKind::Ddpm,
        SamplerKind::Ddim,
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::DpmPlusPlus2M,
        SamplerKind::DpmPlusPlus2MKarras,
    ];

    /// Our command-line name: ddpm, ddim, euler, euler-a, dpm++2m, dpm++2m-karras.
    pub fn cli_name(&self) -> &'static str {
        match self {
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::Ddim => "ddim",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler-a",
            SamplerKind::DpmPlusPlus2M => "dpm++2m",
            SamplerKind::DpmPlusPlus2MKarras => "dpm++2m-karras",
        }
    }

    /// The AUTOMATIC1111 name, as written in PNG `parameters` ("Sampler: Euler a").
    pub fn a1111_name(&self) -> &'static str {
        match self {
            SamplerKind::Ddpm => "DDPM",
            SamplerKind::Ddim => "DDIM",
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerAncestral => "Euler a",
            SamplerKind::DpmPlusPlus2M => "DPM++ 2M",
            SamplerKind::DpmPlusPlus2MKarras => "DPM++ 2M Karras",
        }
    }
}

impl fmt::Display for SamplerKind {
    /// The AUTOMATIC1111 name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.a1111_name())
    }
}

impl FromStr for SamplerKind {
    type Err = anyhow::Error;

    /// Accepts our names and A1111's, ignoring case, spaces, '-' and '_' ("Euler a",
    /// "euler-a", "DPM++ 2M Karras", "dpm++2m-karras", "dpmpp_2m" ...).
    fn from_str(s: &str) -> Result<Self> {
        let key: String = s
            .chars()
            .filter(|c| !matches!(c, ' ' | '-' | '_'))
            .flat_map(char::to_lowercase)
            .collect::<String>()
            .replace("dpmpp", "dpm++");
        Ok(match key.as_str() {
            "ddpm" => SamplerKind::Ddpm,
            "ddim" => SamplerKind::Ddim,
            "euler" => SamplerKind::Euler,
            "eulera" | "eulerancestral" => SamplerKind::EulerAncestral,
            "dpm++2m" => SamplerKind::DpmPlusPlus2M,
            "dpm++2mkarras" => SamplerKind::DpmPlusPlus2MKarras,
            _ => bail!(
                "unknown sampler {s:?}; choose one of {} (or the A1111 names {})",
                SamplerKind::ALL.map(|k| k.cli_name()).join(", "),
                SamplerKind::ALL
                    .map(|k| format!("{:?}", k.a1111_name()))
                    .join(", ")
            ),
        })
    }
}

/// Builds the sampler `kind` for `config` (a diffusers scheduler_config.json of any class) and
/// `num_inference_steps` steps. DDIM uses eta = 0 ([`DdimSampler::new`] takes any eta). The
/// Karras variant forces Karras sigmas; plain DPM++ 2M follows the config's `use_karras_sigmas`
/// like `DPMSolverMultistepScheduler.from_config` does.
pub fn build_sampler(
    kind: SamplerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Sampler>> {
    Ok(match kind {
        SamplerKind::Ddpm => Box::new(DdpmSampler::new(config, num_inference_steps)?),
        SamplerKind::Ddim => Box::new(DdimSampler::new(config, num_inference_steps, 0.0)?),
        SamplerKind::Euler => Box::new(EulerSampler::new(config, num_inference_steps)?),
        SamplerKind::EulerAncestral => {
            Box::new(EulerAncestralSampler::new(config, num_inference_steps)?)
        }
        SamplerKind::DpmPlusPlus2M => Box::new(DpmSolverMultistepSampler::new(
            config,
            num_inference_steps,
            config.use_karras_sigmas,
        )?),
        SamplerKind::DpmPlusPlus2MKarras => Box::new(DpmSolverMultistepSampler::new(
            config,
            num_inference_steps,
            true,
        )?),
    })
}

/// The first step index of img2img at `strength` in [0, 1], as diffusers'
/// `StableDiffusionImg2ImgPipeline.get_timesteps`: the last `int(num_steps * strength)` steps
/// run, so strength 1 starts from step 0 and strength 0 runs none (returns `num_steps`).
pub fn img2img_start_index(num_steps: usize, strength: f64) -> usize {
    let init = ((num_steps as f64 * strength) as usize).min(num_steps);
    num_steps - init
}

/// Rejects config options that ask for behaviour we do not implement, naming the key.
pub(crate) fn check_supported(config: &SchedulerConfig, sampler: &str) -> Result<()> {
    config.validate()?;
    let unsupported = [
        ("thresholding", config.thresholding),
        ("use_exponential_sigmas", config.use_exponential_sigmas),
        ("use_beta_sigmas", config.use_beta_sigmas),
        ("use_lu_lambdas", config.use_lu_lambdas),
        ("use_flow_sigmas", config.use_flow_sigmas),
    ];
    if let Some((key, _)) = unsupported.iter().find(|(_, on)| *on) {
        bail!("{sampler}: scheduler config key {key}=true is not supported (allowed: false)");
    }
    Ok(())
}

/// Clamps the predicted x0 when the config asks for it (DDPM, DDIM).
pub(crate) fn clip_x0(x0: Tensor, range: Option<f64>) -> Result<Tensor> {
    Ok(match range {
        Some(r) => x0.clamp(-r as f32, r as f32)?,
        None => x0,
    })
}

/// `t / s` as a true division, the way torch divides a tensor by a 0-dim float32 tensor.
/// Multiplying by a rounded reciprocal differs by an ulp, which the cancellation in the first
/// Euler step of a zero-terminal-SNR schedule (sigma = 4096) magnifies to 1e-5.
pub(crate) fn div_scalar(t: &Tensor, s: f32) -> Result<Tensor> {
    let s = Tensor::new(s, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&s)?)
}

/// Checks that integer timesteps index the training tables.
pub(crate) fn checked_indices(ts: &[i64], n_train: usize, sampler: &str) -> Result<Vec<usize>> {
    ts.iter()
        .map(|&t| {
            if t < 0 || t as usize >= n_train {
                bail!("{sampler}: timestep {t} is outside 0..{n_train} (check steps_offset)")
            }
            Ok(t as usize)
        })
        .collect()
}

pub(crate) fn step_out_of_range(step_index: usize, num_steps: usize) -> anyhow::Error {
    anyhow::anyhow!("step index {step_index} is out of range for {num_steps} sampling steps")
}

/// sqrt(abar) x0 + sqrt(1 - abar) noise with float32 coefficients, as diffusers' `add_noise`.
pub(crate) fn add_noise_vp(
    original: &Tensor,
    noise: &Tensor,
    alpha_cumprod: f64,
) -> Result<Tensor> {
    let a = alpha_cumprod as f32;
    Ok((original.affine(a.sqrt() as f64, 0.0)? + noise.affine((1.0 - a).sqrt() as f64, 0.0)?)?)
}
