//! Euler ancestral, as diffusers' `EulerAncestralDiscreteScheduler`; the A1111 "Euler a".
//!
//! Each step goes down to sigma_down with an Euler step and adds fresh noise of size sigma_up,
//! where sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's `get_ancestral_step`, eta 1).

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::euler::{denoised, SigmaSchedule};
use super::{check_supported, div_scalar, NoiseSource, Sampler};
use crate::schedule::{FinalSigmasType, PredictionType, SchedulerConfig};

#[derive(Debug, Clone)]
pub struct EulerAncestralSampler {
    schedule: SigmaSchedule,
    prediction_type: PredictionType,
    predicted_original: Option<Tensor>,
}

impl EulerAncestralSampler {
    /// diffusers' Euler ancestral reads neither `use_karras_sigmas` nor `final_sigmas_type`:
    /// sigmas are interpolated at the spaced timesteps and end at 0.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        check_supported(config, "Euler a")?;
        if config.prediction_type == PredictionType::Sample {
            anyhow::bail!("Euler a: prediction_type \"sample\" is not supported (as in diffusers)");
        }
        Ok(Self {
            schedule: SigmaSchedule::new(
                config,
                num_inference_steps,
                false,
                FinalSigmasType::Zero,
            )?,
            prediction_type: config.prediction_type,
            predicted_original: None,
        })
    }

    /// The sigmas of every step plus the final 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.schedule.sigmas
    }
}

impl Sampler for EulerAncestralSampler {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.scale_model_input(sample, step_index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sigma = self.schedule.sigma(step_index)? as f32;
        let sigma_to = self.schedule.sigmas[step_index + 1] as f32;
        let out_dtype = model_output.dtype();
        let model_output = model_output.to_dtype(DType::F32)?;
        let sample = sample.to_dtype(DType::F32)?;
        let x0 = denoised(self.prediction_type, &model_output, &sample, sigma)?;

        let (from2, to2) = (sigma * sigma, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let derivative = div_scalar(&(&sample - &x0)?, sigma)?;
        let prev = (&sample + derivative.affine((sigma_down - sigma) as f64, 0.0)?)?;
        // diffusers draws noise on every step, the last one (sigma_up = 0) included; so do we,
        // to keep the random stream aligned with it.
        let z = noise.sample(model_output.dims(), DType::F32, model_output.device())?;
        let prev = (prev + z.affine(sigma_up as f64, 0.0)?)?;
        self.predicted_original = Some(x0);
        Ok(prev.to_dtype(out_dtype)?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, step_index)
    }

    fn predicted_original(&self) -> Option<&Tensor> {
        self.predicted_original.as_ref()
    }

    fn reset(&mut self) {
        self.predicted_original = None;
    }
}
