//! Timestep and sigma tables, computed the way diffusers computes them.
//!
//! diffusers builds its inference schedules with numpy (`np.linspace`, `np.arange`,
//! `np.round`, `np.interp`) on float32 training tables. Rounding half to even, numpy's
//! `arange` fill rule and float32 sigma tables all decide which integer timestep a step gets, so
//! they are mirrored here literally; the parity tests compare against diffusers' own output.

use anyhow::{bail, Result};

use crate::schedule::TimestepSpacing;

/// `np.linspace(start, stop, num)` (endpoint included): `i * step + start`, last = `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

/// `np.arange(start, stop, step)` for floats: length `ceil((stop - start) / step)` and values
/// `start + i * ((start + step) - start)` (numpy fills from the first two entries).
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len <= 0.0 || !len.is_finite() {
        return Vec::new();
    }
    let delta = (start + step) - start;
    (0..len as usize)
        .map(|i| {
            if i == 0 {
                start
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)`: linear interpolation on integer abscissae, clamped at
/// both ends, exact at integer x.
pub fn np_interp_index(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = fp[j + 1] - fp[j];
    slope * (x - j as f64) + fp[j]
}

/// Integer timesteps shared by DDPM and DDIM (`set_timesteps` of both), descending.
pub fn discrete_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_steps: usize,
    steps_offset: usize,
) -> Result<Vec<i64>> {
    check_steps(num_steps)?;
    let n_train = num_train_timesteps as f64;
    Ok(match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, n_train - 1.0, num_steps)
            .into_iter()
            .rev()
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => leading(num_train_timesteps, num_steps, steps_offset),
        TimestepSpacing::Trailing => trailing(num_train_timesteps, num_steps),
    })
}

/// Float timesteps of Euler and Euler ancestral (`linspace` is not rounded there: with 20 steps
/// the model sees t = 946.4211 and so on), as float32 values.
pub fn euler_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_steps: usize,
    steps_offset: usize,
) -> Result<Vec<f64>> {
    check_steps(num_steps)?;
    let n_train = num_train_timesteps as f64;
    Ok(match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, n_train - 1.0, num_steps)
            .into_iter()
            .rev()
            .map(|t| t as f32 as f64)
            .collect(),
        TimestepSpacing::Leading => leading(num_train_timesteps, num_steps, steps_offset)
            .into_iter()
            .map(|t| t as f64)
            .collect(),
        TimestepSpacing::Trailing => trailing(num_train_timesteps, num_steps)
            .into_iter()
            .map(|t| t as f64)
            .collect(),
    })
}

/// `(arange(0, n) * (T // n)).round()[::-1] + steps_offset`
fn leading(num_train_timesteps: usize, num_steps: usize, steps_offset: usize) -> Vec<i64> {
    let ratio = (num_train_timesteps / num_steps) as i64;
    (0..num_steps as i64)
        .rev()
        .map(|i| i * ratio + steps_offset as i64)
        .collect()
}

/// `round(arange(T, 0, -T / n)) - 1`
fn trailing(num_train_timesteps: usize, num_steps: usize) -> Vec<i64> {
    let n_train = num_train_timesteps as f64;
    np_arange(n_train, 0.0, -(n_train / num_steps as f64))
        .into_iter()
        .map(|t| t.round_ties_even() as i64 - 1)
        .collect()
}

pub fn check_steps(num_steps: usize) -> Result<()> {
    if num_steps == 0 {
        bail!("the number of sampling steps must be at least 1");
    }
    Ok(())
}

/// The k-diffusion noise levels sigma_t = sqrt((1 - abar_t) / abar_t), computed in float32 as
/// diffusers does from its float32 alphas_cumprod.
pub fn sigma_table(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|&a| {
            let a = a as f32;
            ((1.0 - a) / a).sqrt() as f64
        })
        .collect()
}

/// Karras et al. (2022) eq. 5 with rho = 7: `num_steps` sigmas from sigma_max down to sigma_min,
/// evenly spaced in sigma^(1/rho).
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, num_steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, num_steps)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose sigma is `sigma`, by linear
/// interpolation in log sigma. `log_sigmas` is the float32 log of [`sigma_table`].
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // Index of the last table entry not above log_sigma (0 when there is none), kept below the
    // end so there is always a right neighbour.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    // numpy evaluates `low - high` in float32 and the rest in float64.
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Float32 natural log of each sigma, as `np.log` on diffusers' float32 sigma table.
pub fn log_sigma_table(sigmas: &[f64]) -> Vec<f32> {
    sigmas.iter().map(|&s| (s as f32).ln()).collect()
}
