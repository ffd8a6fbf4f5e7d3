//! Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, Algorithm 1
//! without churn), as diffusers' `EulerDiscreteScheduler`; the A1111 "Euler" sampler.
//!
//! The sample lives at scale x = x0 + sigma * eps (variance-exploding form); the model sees
//! x / sqrt(sigma^2 + 1), which is the variance-preserving x_t it was trained on.

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::spacing::{
    euler_timesteps, karras_sigmas, log_sigma_table, np_interp_index, sigma_table, sigma_to_t,
};
use super::{check_supported, div_scalar, NoiseSource, Sampler};
use crate::schedule::{
    FinalSigmasType, NoiseSchedule, PredictionType, SchedulerConfig, TimestepSpacing,
};

/// Timesteps and sigmas shared by Euler and Euler ancestral.
#[derive(Debug, Clone)]
pub(crate) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    /// One per step plus the final sigma; float32 values.
    pub sigmas: Vec<f64>,
    pub init_noise_sigma: f64,
}

/// The training alphas_cumprod as the sigma-space schedulers use it: with zero terminal SNR the
/// last entry becomes 2^-24 (float16's smallest subnormal) so that the first sigma is finite.
pub(crate) fn sigma_space_alphas_cumprod(config: &SchedulerConfig) -> Result<Vec<f64>> {
    let mut abar = NoiseSchedule::new(config)?.alphas_cumprod().to_vec();
    if config.rescale_betas_zero_snr {
        *abar.last_mut().expect("schedule is not empty") = 2f64.powi(-24);
    }
    Ok(abar)
}

impl SigmaSchedule {
    /// `karras` and `final_sigma` are Euler's options; Euler ancestral passes `false` and zero.
    pub fn new(
        config: &SchedulerConfig,
        num_steps: usize,
        karras: bool,
        final_sigmas_type: FinalSigmasType,
    ) -> Result<Self> {
        let spacing = config.timestep_spacing_or(TimestepSpacing::Linspace);
        let abar = sigma_space_alphas_cumprod(config)?;
        let table = sigma_table(&abar);
        let mut timesteps = euler_timesteps(
            spacing,
            config.num_train_timesteps,
            num_steps,
            config.steps_offset,
        )?;
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| np_interp_index(t, &table))
            .collect();
        if karras {
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(sigma_min, sigma_max, num_steps);
            let log_sigmas = log_sigma_table(&table);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64)
                .collect();
        }
        sigmas.push(match final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => table[0],
        });
        let sigmas: Vec<f64> = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        let max_sigma = sigmas.iter().cloned().fold(f64::NEG_INFINITY, f64::max) as f32;
        // With "leading" spacing the first timestep is below T-1, and diffusers then scales the
        // initial noise as if it were the VP sample at that sigma.
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        } as f64;
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
        })
    }

    pub fn sigma(&self, step_index: usize) -> Result<f64> {
        if step_index + 1 >= self.sigmas.len() {
            return Err(super::step_out_of_range(step_index, self.sigmas.len() - 1));
        }
        Ok(self.sigmas[step_index])
    }

    /// x / sqrt(sigma^2 + 1)
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = self.sigma(step_index)? as f32;
        div_scalar(sample, (sigma * sigma + 1.0).sqrt())
    }

    /// x0 + sigma * noise
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        let sigma = self.sigma(step_index)?;
        Ok((original + noise.affine(sigma, 0.0)?)?)
    }
}

/// x0 predicted from the model output at noise level sigma (k-diffusion's denoiser).
pub(crate) fn denoised(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction_type {
        PredictionType::Epsilon => (sample - model_output.affine(sigma as f64, 0.0)?)?,
        // c_out = -sigma / sqrt(sigma^2 + 1), c_skip = 1 / (sigma^2 + 1)
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            (model_output.affine((-sigma / s2.sqrt()) as f64, 0.0)? + div_scalar(sample, s2)?)?
        }
        PredictionType::Sample => model_output.clone(),
    })
}

#[derive(Debug, Clone)]
pub struct EulerSampler {
    schedule: SigmaSchedule,
    prediction_type: PredictionType,
    predicted_original: Option<Tensor>,
}

impl EulerSampler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        check_supported(config, "Euler")?;
        Ok(Self {
            schedule: SigmaSchedule::new(
                config,
                num_inference_steps,
                config.use_karras_sigmas,
                config.final_sigmas_type,
            )?,
            prediction_type: config.prediction_type,
            predicted_original: None,
        })
    }

    /// The sigmas of every step plus the final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.schedule.sigmas
    }
}

impl Sampler for EulerSampler {
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sigma = self.schedule.sigma(step_index)? as f32;
        let sigma_next = self.schedule.sigmas[step_index + 1] as f32;
        let out_dtype = model_output.dtype();
        let model_output = model_output.to_dtype(DType::F32)?;
        let sample = sample.to_dtype(DType::F32)?;
        let x0 = denoised(self.prediction_type, &model_output, &sample, sigma)?;
        let derivative = div_scalar(&(&sample - &x0)?, sigma)?;
        let prev = (&sample + derivative.affine((sigma_next - sigma) as f64, 0.0)?)?;
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
