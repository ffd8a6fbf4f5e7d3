//! DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), as diffusers' `DDPMScheduler`.
//!
//! With fewer inference steps than training steps each step jumps from t to the next scheduled
//! t' < t, using the effective beta 1 - abar_t / abar_t' of that jump (diffusers does the same).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::{check_supported, clip_x0, div_scalar, NoiseSource, Sampler};
use crate::schedule::{
    NoiseSchedule, PredictionType, SchedulerConfig, TimestepSpacing, VarianceType,
};

#[derive(Debug, Clone)]
pub struct DdpmSampler {
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    discrete: Vec<usize>,
    prediction_type: PredictionType,
    variance_type: VarianceType,
    clip: Option<f64>,
    predicted_original: Option<Tensor>,
}

impl DdpmSampler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        check_supported(config, "DDPM")?;
        let n_train = config.num_train_timesteps;
        if num_inference_steps > n_train {
            bail!(
                "DDPM: {num_inference_steps} steps is more than the {n_train} training timesteps"
            );
        }
        let schedule = NoiseSchedule::new(config)?;
        let spacing = config.timestep_spacing_or(TimestepSpacing::Leading);
        let ts = super::spacing::discrete_timesteps(
            spacing,
            n_train,
            num_inference_steps,
            config.steps_offset,
        )?;
        let discrete = super::checked_indices(&ts, n_train, "DDPM")?;
        Ok(Self {
            alphas_cumprod: schedule.alphas_cumprod().to_vec(),
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            discrete,
            prediction_type: config.prediction_type,
            variance_type: config.variance_type.unwrap_or(VarianceType::FixedSmall),
            clip: config
                .clip_sample
                .unwrap_or(true)
                .then_some(config.clip_sample_range),
            predicted_original: None,
        })
    }
}

impl Sampler for DdpmSampler {
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

        // Scalars in float32, operation for operation as diffusers, which keeps the
        // cancellation in 1 - abar_t / abar_prev identical to it.
        let abar_t = self.alphas_cumprod[t] as f32;
        let abar_prev = match self.discrete.get(step_index + 1) {
            Some(&prev) => self.alphas_cumprod[prev] as f32,
            None => 1.0,
        };
        let beta_prod_t = 1.0 - abar_t;
        let beta_prod_prev = 1.0 - abar_prev;
        let current_alpha = abar_t / abar_prev;
        let current_beta = 1.0 - current_alpha;

        let x0 = match self.prediction_type {
            PredictionType::Epsilon => {
                let noisy_part =
                    (&sample - model_output.affine(beta_prod_t.sqrt() as f64, 0.0)?)?;
                div_scalar(&noisy_part, abar_t.sqrt())?
            }
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => {
                (sample.affine(abar_t.sqrt() as f64, 0.0)?
                    - model_output.affine(beta_prod_t.sqrt() as f64, 0.0)?)?
            }
        };
        let x0 = clip_x0(x0, self.clip)?;

        let x0_coeff = abar_prev.sqrt() * current_beta / beta_prod_t;
        let sample_coeff = current_alpha.sqrt() * beta_prod_prev / beta_prod_t;
        let mut prev =
            (x0.affine(x0_coeff as f64, 0.0)? + sample.affine(sample_coeff as f64, 0.0)?)?;

        // diffusers adds noise whenever the current timestep is not 0, even on a last step
        // from t = 1 (leading spacing with steps_offset 1), so we do too.
        if t > 0 {
            let variance = match self.variance_type {
                VarianceType::FixedSmall => {
                    (beta_prod_prev / beta_prod_t * current_beta).max(1e-20)
                }
                VarianceType::FixedLarge => current_beta,
            };
            let z = noise.sample(model_output.dims(), DType::F32, model_output.device())?;
            prev = (prev + z.affine(variance.sqrt() as f64, 0.0)?)?;
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
