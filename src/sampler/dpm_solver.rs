//! DPM-Solver++(2M) (Lu et al. 2022), as diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type="dpmsolver++"` and `solver_order=2`; the A1111 "DPM++ 2M" and, with Karras
//! sigmas, "DPM++ 2M Karras".
//!
//! The solver works in lambda = log(alpha_t / sigma_t) and on the model's x0 prediction; the
//! second-order step reuses the x0 prediction of the previous step (multistep), so the sampler
//! keeps state between steps: call [`Sampler::reset`] (or build a new one) for a new run.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::euler::sigma_space_alphas_cumprod;
use super::spacing::{
    check_steps, karras_sigmas, log_sigma_table, np_arange, np_interp_index, np_linspace,
    sigma_table, sigma_to_t,
};
use super::{check_supported, div_scalar, NoiseSource, Sampler};
use crate::schedule::{
    BetaSchedule, FinalSigmasType, PredictionType, SchedulerConfig, SolverType, TimestepSpacing,
};

#[derive(Debug, Clone)]
pub struct DpmSolverMultistepSampler {
    timesteps: Vec<f64>,
    /// One per step plus the final one; float32 values.
    sigmas: Vec<f64>,
    prediction_type: PredictionType,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// x0 prediction of the previous step (diffusers' `model_outputs[-2]` after the shift).
    previous_x0: Option<Tensor>,
    predicted_original: Option<Tensor>,
    /// How many steps have run, capped at the solver order (diffusers' `lower_order_nums`).
    lower_order_nums: usize,
}

/// (alpha_t, sigma_t) of the VP process at k-diffusion noise level sigma, in float32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

impl DpmSolverMultistepSampler {
    /// `use_karras_sigmas` overrides the config's key of the same name (the "Karras" variant).
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
        use_karras_sigmas: bool,
    ) -> Result<Self> {
        check_supported(config, "DPM++ 2M")?;
        check_steps(num_inference_steps)?;
        let n = num_inference_steps;
        let n_train = config.num_train_timesteps;
        let abar = sigma_space_alphas_cumprod(config)?;

        // lambda(t) decreases with t; clipping it from below drops the noisiest timesteps.
        let last_timestep = match config.lambda_min_clipped {
            Some(min) => {
                let mut lambdas: Vec<f32> = abar
                    .iter()
                    .map(|&a| {
                        let a = a as f32;
                        a.sqrt().ln() - (1.0 - a).sqrt().ln()
                    })
                    .collect();
                lambdas.reverse();
                n_train - lambdas.partition_point(|&l| (l as f64) < min)
            }
            None => n_train,
        };
        let spacing = config.timestep_spacing_or(TimestepSpacing::Linspace);
        let mut timesteps: Vec<f64> = match spacing {
            // n + 1 points from T-1 down to 0, dropping the 0.
            TimestepSpacing::Linspace => np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                .into_iter()
                .rev()
                .take(n)
                .map(|t| t.round_ties_even())
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                np_arange(last_timestep as f64, 0.0, -(n_train as f64 / n as f64))
                    .into_iter()
                    .map(|t| t.round_ties_even() - 1.0)
                    .collect()
            }
        };

        let table = sigma_table(&abar);
        let mut sigmas: Vec<f64> = if use_karras_sigmas {
            let sigma_min = config.sigma_min.unwrap_or(table[0]);
            let sigma_max = config.sigma_max.unwrap_or(table[table.len() - 1]);
            let sigmas = karras_sigmas(sigma_min, sigma_max, n);
            let log_sigmas = log_sigma_table(&table);
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    // diffusers rounds except for the cosine schedule, then truncates to int64.
                    let t = if config.beta_schedule == BetaSchedule::SquaredcosCapV2 {
                        t
                    } else {
                        t.round_ties_even()
                    };
                    t.trunc()
                })
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|&t| np_interp_index(t, &table))
                .collect()
        };
        if let Some(t) = timesteps.iter().find(|&&t| t < 0.0 || t >= n_train as f64) {
            bail!("DPM++ 2M: timestep {t} is outside 0..{n_train} (check steps_offset)");
        }
        sigmas.push(match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => table[0],
        });
        Ok(Self {
            timesteps,
            sigmas: sigmas.into_iter().map(|s| s as f32 as f64).collect(),
            prediction_type: config.prediction_type,
            solver_type: config.solver_type,
            lower_order_final: config.lower_order_final,
            euler_at_final: config.euler_at_final,
            final_sigma_zero: config.final_sigmas_type == FinalSigmasType::Zero,
            previous_x0: None,
            predicted_original: None,
            lower_order_nums: 0,
        })
    }

    /// The sigmas of every step plus the final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn sigma(&self, step_index: usize) -> Result<f32> {
        if step_index + 1 >= self.sigmas.len() {
            return Err(super::step_out_of_range(step_index, self.timesteps.len()));
        }
        Ok(self.sigmas[step_index] as f32)
    }
}

impl Sampler for DpmSolverMultistepSampler {
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sigma_s0 = self.sigma(step_index)?;
        let n = self.timesteps.len();
        let out_dtype = model_output.dtype();
        let model_output = model_output.to_dtype(DType::F32)?;
        let sample = sample.to_dtype(DType::F32)?;

        // Convert the model output to an x0 prediction at the current sigma.
        let (alpha_s0, sig_s0) = alpha_sigma(sigma_s0);
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => div_scalar(
                &(&sample - model_output.affine(sig_s0 as f64, 0.0)?)?,
                alpha_s0,
            )?,
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => {
                (sample.affine(alpha_s0 as f64, 0.0)? - model_output.affine(sig_s0 as f64, 0.0)?)?
            }
        };

        // A second-order step needs the lambda gap to the next sigma; with a final sigma of 0
        // that gap is infinite, so the last step is first order (as in diffusers), and short
        // schedules also end first order for stability.
        let lower_order_final = step_index == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index + 1] as f32);
        let lambda_t = alpha_t.ln() - sigma_t.ln();
        let lambda_s0 = alpha_s0.ln() - sig_s0.ln();
        let h = lambda_t - lambda_s0;
        let phi = alpha_t * ((-h).exp() - 1.0);
        // x_t = (sigma_t / sigma_s0) x - alpha_t (e^{-h} - 1) D0 (+ correction)
        let mut prev =
            (sample.affine((sigma_t / sig_s0) as f64, 0.0)? - x0.affine(phi as f64, 0.0)?)?;

        let previous = self.previous_x0.take();
        let first_order = self.lower_order_nums < 1 || lower_order_final || step_index == 0;
        if let (Some(m1), false) = (&previous, first_order) {
            let sigma_s1 = self.sigmas[step_index - 1] as f32;
            let (alpha_s1, sig_s1) = alpha_sigma(sigma_s1);
            let lambda_s1 = alpha_s1.ln() - sig_s1.ln();
            let r0 = (lambda_s0 - lambda_s1) / h;
            // D1 = (m0 - m1) / r0
            let d1 = ((&x0 - m1)? * (1.0 / r0) as f64)?;
            let coeff = match self.solver_type {
                SolverType::Midpoint => -0.5 * phi,
                SolverType::Heun => alpha_t * (((-h).exp() - 1.0) / h + 1.0),
            };
            prev = (prev + d1.affine(coeff as f64, 0.0)?)?;
        }
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        self.previous_x0 = Some(x0.clone());
        self.predicted_original = Some(x0);
        Ok(prev.to_dtype(out_dtype)?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigma(step_index)?);
        Ok((original.affine(alpha as f64, 0.0)? + noise.affine(sigma as f64, 0.0)?)?)
    }

    fn predicted_original(&self) -> Option<&Tensor> {
        self.predicted_original.as_ref()
    }

    fn reset(&mut self) {
        self.previous_x0 = None;
        self.predicted_original = None;
        self.lower_order_nums = 0;
    }
}
