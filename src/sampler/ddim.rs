//! DDIM (Song et al. 2021), as diffusers' `DDIMScheduler`: deterministic for eta = 0, with
//! eta = 1 the DDPM posterior variance.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::{check_supported, clip_x0, div_scalar, NoiseSource, Sampler};
use crate::schedule::{NoiseSchedule, PredictionType, SchedulerConfig, TimestepSpacing};

#[derive(Debug, Clone)]
pub struct DdimSampler {
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    discrete: Vec<usize>,
    /// diffusers steps back by T // n from every timestep, whatever the spacing (so with
    /// "linspace" the previous timestep is not the next scheduled one); mirrored for parity.
    step_ratio: i64,
    eta: f64,
    prediction_type: PredictionType,
    clip: Option<f64>,
    predicted_original: Option<Tensor>,
}

impl DdimSampler {
    /// `eta` = 0 is the deterministic DDIM of the A1111 "DDIM" sampler and diffusers' pipelines.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize, eta: f64) -> Result<Self> {
        check_supported(config, "DDIM")?;
        let n_train = config.num_train_timesteps;
        if num_inference_steps > n_train {
            bail!(
                "DDIM: {num_inference_steps} steps is more than the {n_train} training timesteps"
            );
        }
        if eta.is_nan() || eta < 0.0 {
            bail!("DDIM: eta must be >= 0, got {eta}");
        }
        let schedule = NoiseSchedule::new(config)?;
        let spacing = config.timestep_spacing_or(TimestepSpacing::Leading);
        let ts = super::spacing::discrete_timesteps(
            spacing,
            n_train,
            num_inference_steps,
            config.steps_offset,
        )?;
        let discrete = super::checked_indices(&ts, n_train, "DDIM")?;
        let abar = schedule.alphas_cumprod().to_vec();
        Ok(Self {
            final_alpha_cumprod: if config.set_alpha_to_one.unwrap_or(true) {
                1.0
            } else {
                abar[0]
            },
            alphas_cumprod: abar,
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            discrete,
            step_ratio: (n_train / num_inference_steps) as i64,
            eta,
            prediction_type: config.prediction_type,
            clip: config
                .clip_sample
                .unwrap_or(true)
                .then_some(config.clip_sample_range),
            predicted_original: None,
        })
    }
}

impl Sampler for DdimSampler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = *self
            .discrete
            .get(step_index)
            .ok_or_else(|| super::step_out_of_range(step_index, self.discrete.len()))?;
        let out_dtype = model_output.dtype();
        let model_output = model_output.to_dtype(DType::F32)?;
        let sample = sample.to_dtype(DType::F32)?;

        // Scalars in float32 like diffusers.
        let prev_t = t as i64 - self.step_ratio;
        let abar_t = self.alphas_cumprod[t] as f32;
        let abar_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize] as f32
        } else {
            self.final_alpha_cumprod as f32
        };
        let beta_prod_t = 1.0 - abar_t;
        let (sa, sb) = (abar_t.sqrt() as f64, beta_prod_t.sqrt() as f64);

        let (x0, eps) = match self.prediction_type {
            PredictionType::Epsilon => (
                div_scalar(&(&sample - model_output.affine(sb, 0.0)?)?, sa as f32)?,
                model_output.clone(),
            ),
            PredictionType::Sample => (
                model_output.clone(),
                div_scalar(&(&sample - model_output.affine(sa, 0.0)?)?, sb as f32)?,
            ),
            PredictionType::VPrediction => (
                (sample.affine(sa, 0.0)? - model_output.affine(sb, 0.0)?)?,
                (model_output.affine(sa, 0.0)? + sample.affine(sb, 0.0)?)?,
            ),
        };
        let x0 = clip_x0(x0, self.clip)?;

        let beta_prod_prev = 1.0 - abar_prev;
        let variance = (beta_prod_prev / beta_prod_t) * (1.0 - abar_t / abar_prev);
        let std_dev = self.eta as f32 * variance.sqrt();
        let direction = (1.0 - abar_prev - std_dev * std_dev).sqrt();
        let mut prev =
            (x0.affine(abar_prev.sqrt() as f64, 0.0)? + eps.affine(direction as f64, 0.0)?)?;
        if self.eta > 0.0 {
            let z = noise.sample(model_output.dims(), DType::F32, model_output.device())?;
            prev = (prev + z.affine(std_dev as f64, 0.0)?)?;
        }
        self.predicted_original = Some(x0);
        Ok(prev.to_dtype(out_dtype)?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = *self
            .discrete
            .get(step_index)
            .ok_or_else(|| super::step_out_of_range(step_index, self.discrete.len()))?;
        super::add_noise_vp(original, noise, self.alphas_cumprod[t])
    }

    fn predicted_original(&self) -> Option<&Tensor> {
        self.predicted_original.as_ref()
    }

    fn reset(&mut self) {
        self.predicted_original = None;
    }
}
