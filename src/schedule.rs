//! Noise schedules: the forward process q(x_t | x_0) of DDPM and everything derived from it.
//!
//! [`SchedulerConfig`] reads diffusers' `scheduler/scheduler_config.json` (any scheduler class:
//! unknown keys are ignored). [`NoiseSchedule`] turns it into the tables betas, alphas and
//! alphas_cumprod, and offers what training needs with a timestep PER SAMPLE: `q_sample`,
//! v-prediction targets, conversions between eps / x0 / v predictions, SNR, and the posterior
//! q(x_{t-1} | x_t, x_0).
//!
//! The tables match diffusers' to float32 rounding: diffusers builds betas in float32 (torch's
//! default dtype), so we do too (computing them in f64 would differ from the published schedules
//! by up to ~1e-5 relative at large t), and alphas = 1 - betas rounded to float32 as diffusers
//! does. alphas_cumprod is the f64 product of those alphas: torch's CPU cumprod accumulates in
//! double too and only rounds each entry to float32, so `alphas_cumprod[t] as f32` is diffusers'
//! table. Our `betas` are then 1 - alphas in f64 (within 6e-8 of diffusers' float32 betas), so
//! that betas, alphas and alphas_cumprod describe one forward process exactly: the posterior
//! identities need abar_t = abar_{t-1} (1 - beta_t), and float32 rounding would break them by
//! ~3e-4 at small t, where 1 - abar_t is tiny. The samplers round to float32 where diffusers
//! computes in float32.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Defines a config enum that (de)serialises as diffusers' string and whose parse error names
/// the config key and every allowed value, e.g.
/// `beta_schedule: unsupported value "foo" (allowed: linear, scaled_linear, ...)`.
macro_rules! config_enum {
    ($(#[$meta:meta])* $name:ident, $key:literal, { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// The config key this value is read from.
            pub const KEY: &'static str = $key;
            /// Every accepted spelling, as diffusers writes it.
            pub const ALLOWED: &'static [&'static str] = &[$($text),+];

            pub fn as_str(&self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = anyhow::Error;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => bail!(
                        "{}: unsupported value {:?} (allowed: {})",
                        $key,
                        other,
                        Self::ALLOWED.join(", ")
                    ),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(|e: anyhow::Error| serde::de::Error::custom(e))
            }
        }
    };
}

config_enum!(
    /// How betas are laid out over the training timesteps.
    BetaSchedule, "beta_schedule", {
        Linear => "linear",
        /// Linear in sqrt(beta): the latent-diffusion (Stable Diffusion) schedule.
        ScaledLinear => "scaled_linear",
        /// The cosine schedule of Nichol & Dhariwal (GLIDE), betas capped at 0.999.
        SquaredcosCapV2 => "squaredcos_cap_v2",
        /// GeoDiff's sigmoid schedule.
        Sigmoid => "sigmoid",
    }
);

config_enum!(
    /// What the network predicts.
    PredictionType, "prediction_type", {
        /// The noise eps that was added.
        Epsilon => "epsilon",
        /// v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022).
        VPrediction => "v_prediction",
        /// x0 itself.
        Sample => "sample",
    }
);

config_enum!(
    /// How inference timesteps are picked from the training timesteps (Table 2 of
    /// "Common Diffusion Noise Schedules and Sample Steps are Flawed").
    TimestepSpacing, "timestep_spacing", {
        Leading => "leading",
        Trailing => "trailing",
        Linspace => "linspace",
    }
);

config_enum!(
    /// The variance of DDPM's reverse step.
    VarianceType, "variance_type", {
        /// beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t, the true posterior variance.
        FixedSmall => "fixed_small",
        /// beta_t, the upper bound of Ho et al.
        FixedLarge => "fixed_large",
    }
);

config_enum!(
    /// The sigma after the last step of the sigma-space samplers (Euler, DPM-Solver).
    FinalSigmasType, "final_sigmas_type", {
        Zero => "zero",
        SigmaMin => "sigma_min",
    }
);

config_enum!(
    /// How Euler interpolates sigmas between training timesteps.
    InterpolationType, "interpolation_type", {
        Linear => "linear",
    }
);

config_enum!(
    /// Whether the model sees discrete timesteps (only this is supported).
    TimestepType, "timestep_type", {
        Discrete => "discrete",
    }
);

config_enum!(
    /// DPM-Solver's second-order update rule.
    SolverType, "solver_type", {
        Midpoint => "midpoint",
        Heun => "heun",
    }
);

fn default_num_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> BetaSchedule {
    BetaSchedule::Linear
}
fn default_prediction_type() -> PredictionType {
    PredictionType::Epsilon
}
fn default_clip_sample_range() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}
fn default_final_sigmas_type() -> FinalSigmasType {
    FinalSigmasType::Zero
}
fn default_interpolation_type() -> InterpolationType {
    InterpolationType::Linear
}
fn default_timestep_type() -> TimestepType {
    TimestepType::Discrete
}
fn default_solver_type() -> SolverType {
    SolverType::Midpoint
}

/// diffusers' `scheduler_config.json`, for any of the schedulers we mirror.
///
/// Defaults are diffusers'. Where diffusers' scheduler classes disagree on a default
/// (`timestep_spacing`: "leading" for DDPM/DDIM, "linspace" for Euler/DPM-Solver; `clip_sample`:
/// true for DDPM/DDIM; `set_alpha_to_one`: true for DDIM; `variance_type`) the field is an
/// `Option` and each sampler applies its own class's default, so loading Stable Diffusion 1.5's
/// PNDM config into our Euler gives exactly what `EulerDiscreteScheduler.from_config` gives.
///
/// Keys we read but do not implement (`thresholding`, `use_exponential_sigmas`, ...) are checked
/// by the samplers and rejected with an error when they ask for the unimplemented behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(
        rename = "_class_name",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub class_name: Option<String>,
    #[serde(default = "default_num_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; when present they replace beta_start/beta_end/beta_schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "default_prediction_type")]
    pub prediction_type: PredictionType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<TimestepSpacing>,
    #[serde(default)]
    pub steps_offset: usize,
    /// Rescale betas so that abar_T = 0 (zero terminal SNR, Lin et al. 2023, Algorithm 1).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Clip the predicted x0 to [-clip_sample_range, clip_sample_range] (DDPM, DDIM; default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_sample: Option<bool>,
    #[serde(default = "default_clip_sample_range")]
    pub clip_sample_range: f64,
    /// DDIM: abar "before" the first training step is 1 (true, default) or abar_0 (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_alpha_to_one: Option<bool>,
    /// DDPM: fixed_small (default) or fixed_large. DPM-Solver only reads the learned variants,
    /// which are not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variance_type: Option<VarianceType>,
    /// Dynamic thresholding (Imagen); not supported, must be false.
    #[serde(default)]
    pub thresholding: bool,
    /// Karras et al. (2022) sigma spacing for Euler and DPM-Solver.
    #[serde(default)]
    pub use_karras_sigmas: bool,
    /// Not supported, must be false.
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    /// Not supported, must be false.
    #[serde(default)]
    pub use_beta_sigmas: bool,
    /// Not supported, must be false.
    #[serde(default)]
    pub use_lu_lambdas: bool,
    /// Not supported, must be false.
    #[serde(default)]
    pub use_flow_sigmas: bool,
    /// Overrides the smallest sigma of the Karras schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma_min: Option<f64>,
    /// Overrides the largest sigma of the Karras schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma_max: Option<f64>,
    #[serde(default = "default_interpolation_type")]
    pub interpolation_type: InterpolationType,
    #[serde(default = "default_timestep_type")]
    pub timestep_type: TimestepType,
    #[serde(default = "default_final_sigmas_type")]
    pub final_sigmas_type: FinalSigmasType,
    /// DPM-Solver's order. Our DPM++ 2M sampler is second order whatever this says; it is kept so
    /// that a config round-trips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver_order: Option<usize>,
    /// DPM-Solver's algorithm. Our DPM++ 2M sampler is "dpmsolver++" whatever this says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm_type: Option<String>,
    #[serde(default = "default_solver_type")]
    pub solver_type: SolverType,
    /// DPM-Solver: use lower-order steps at the end when there are fewer than 15 steps.
    #[serde(default = "default_true")]
    pub lower_order_final: bool,
    /// DPM-Solver: always end with a first-order (Euler) step.
    #[serde(default)]
    pub euler_at_final: bool,
    /// DPM-Solver: clip lambda(t) = log(alpha_t / sigma_t) from below (None = -inf). Non-finite
    /// numbers cannot be written to JSON, hence the Option.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda_min_clipped: Option<f64>,
}

impl Default for SchedulerConfig {
    /// diffusers' defaults (the DDPM paper's linear 1e-4..0.02 schedule over 1000 steps).
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty scheduler config uses only defaults")
    }
}

impl SchedulerConfig {
    /// Stable Diffusion 1.x's schedule: scaled_linear 0.00085..0.012, steps_offset 1, epsilon.
    pub fn stable_diffusion_v1() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            steps_offset: 1,
            clip_sample: Some(false),
            set_alpha_to_one: Some(false),
            ..Self::default()
        }
    }

    /// Parses a scheduler_config.json document. diffusers writes it with Python's `json`, which
    /// emits `-Infinity` for DPM-Solver's default `lambda_min_clipped`; such non-finite tokens
    /// are read as null (= unset, which for lambda_min_clipped means no clipping).
    pub fn from_json_str(json: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(&python_json_to_json(json))
            .context("parsing a scheduler config")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `scheduler_config.json` (or any file with its content).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scheduler config {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&python_json_to_json(&text))
            .with_context(|| format!("parsing scheduler config {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("in scheduler config {}", path.display()))?;
        Ok(cfg)
    }

    /// Checks values that serde alone cannot.
    pub fn validate(&self) -> Result<()> {
        if self.num_train_timesteps < 2 {
            bail!(
                "num_train_timesteps: must be at least 2, got {}",
                self.num_train_timesteps
            );
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != self.num_train_timesteps {
                bail!(
                    "trained_betas: has {} values but num_train_timesteps is {}",
                    betas.len(),
                    self.num_train_timesteps
                );
            }
            if let Some(b) = betas.iter().find(|b| !(**b > 0.0 && **b <= 1.0)) {
                bail!("trained_betas: every beta must be in (0, 1], found {b}");
            }
        }
        Ok(())
    }

    /// The timestep spacing, or `default` (the scheduler class's own default) when unset.
    pub fn timestep_spacing_or(&self, default: TimestepSpacing) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(default)
    }
}

/// Replaces the tokens Python's `json` writes for non-finite floats (`NaN`, `Infinity`,
/// `-Infinity`) with `null`, outside strings, so serde_json can read diffusers' config files.
fn python_json_to_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if c == '\\' {
                // Copy the escape and the escaped character together.
                let n = c.len_utf8() + rest[1..].chars().next().map_or(0, char::len_utf8);
                out.push_str(&rest[..n]);
                rest = &rest[n..];
                continue;
            }
            in_string = c != '"';
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// torch.linspace(start, end, steps, dtype=float32) on CPU: both halves are computed from their
/// own end, which makes the endpoints exact.
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// torch.cumprod on a CPU float32 tensor: accumulated in double, each entry rounded to float32.
fn torch_cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine alpha_bar of improved DDPM.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, Algorithm 1), in float32 like it.
/// Shifts sqrt(abar) so the last step has abar = 0, rescales so the first keeps its value.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_abar: Vec<f32> = torch_cumprod_f32(&alphas)
        .iter()
        .map(|a| a.sqrt())
        .collect();
    let first = sqrt_abar[0];
    let last = sqrt_abar[sqrt_abar.len() - 1];
    let scale = first / (first - last);
    for v in sqrt_abar.iter_mut() {
        *v -= last;
        *v *= scale;
    }
    let abar: Vec<f32> = sqrt_abar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(abar.len());
    out.push(1.0 - abar[0]);
    for i in 1..abar.len() {
        out.push(1.0 - abar[i] / abar[i - 1]);
    }
    out
}

/// Betas in float32, as every diffusers scheduler builds them.
fn betas_f32(cfg: &SchedulerConfig) -> Result<Vec<f32>> {
    let n = cfg.num_train_timesteps;
    let betas = if let Some(trained) = &cfg.trained_betas {
        if trained.len() != n {
            bail!(
                "trained_betas: has {} values but num_train_timesteps is {n}",
                trained.len()
            );
        }
        trained.iter().map(|&b| b as f32).collect()
    } else {
        match cfg.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredcosCapV2 => cosine_betas(n),
            BetaSchedule::Sigmoid => {
                let range = (cfg.beta_end - cfg.beta_start) as f32;
                let start = cfg.beta_start as f32;
                torch_linspace_f32(-6.0, 6.0, n)
                    .into_iter()
                    .map(|x| 1.0 / (1.0 + (-x).exp()) * range + start)
                    .collect()
            }
        }
    };
    Ok(if cfg.rescale_betas_zero_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    })
}

/// The forward process of a diffusion model and the quantities derived from it.
///
/// Timesteps index the tables: t = 0 is the least noisy step, t = T-1 the noisiest. Tensor
/// methods take `t` as an integer tensor (u32, u8 or i64) of shape (B,), one timestep per sample,
/// and broadcast it over the other dimensions of the (B, ...) data tensors.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub prediction_type: PredictionType,
    betas: Vec<f64>,
    alphas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
}

/// Per-sample coefficients for a batch of timesteps, each shaped (B, 1, ..., 1) to broadcast
/// against the data tensor they were made for.
#[derive(Debug, Clone)]
pub struct Coefficients {
    /// sqrt(abar_t)
    pub sqrt_alpha_cumprod: Tensor,
    /// sqrt(1 - abar_t)
    pub sqrt_one_minus_alpha_cumprod: Tensor,
}

impl NoiseSchedule {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        cfg.validate()?;
        let betas32 = betas_f32(cfg)?;
        let alphas: Vec<f64> = betas32.iter().map(|b| (1.0 - b) as f64).collect();
        let betas = alphas.iter().map(|a| 1.0 - a).collect();
        let alphas_cumprod = alphas
            .iter()
            .scan(1f64, |acc, a| {
                *acc *= a;
                Some(*acc)
            })
            .collect();
        Ok(Self {
            prediction_type: cfg.prediction_type,
            betas,
            alphas,
            alphas_cumprod,
        })
    }

    /// T, the number of training timesteps.
    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    pub fn betas(&self) -> &[f64] {
        &self.betas
    }

    pub fn alphas(&self) -> &[f64] {
        &self.alphas
    }

    /// abar_t = prod_{s <= t} alpha_s.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// abar_{t-1}, with abar_{-1} = 1 (no noise before the first step).
    pub fn alpha_cumprod_prev(&self, t: usize) -> f64 {
        if t == 0 {
            1.0
        } else {
            self.alphas_cumprod[t - 1]
        }
    }

    /// Signal-to-noise ratio abar_t / (1 - abar_t) (0 at a zero-terminal-SNR last step).
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        a / (1.0 - a)
    }

    /// Coefficients (of x0, of x_t) of the posterior mean
    /// mu_tilde(x_t, x0) = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0
    ///                   + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t   (Ho et al. eq. 7).
    pub fn posterior_mean_coefficients(&self, t: usize) -> (f64, f64) {
        let abar = self.alphas_cumprod[t];
        let abar_prev = self.alpha_cumprod_prev(t);
        let beta = self.betas[t];
        (
            abar_prev.sqrt() * beta / (1.0 - abar),
            self.alphas[t].sqrt() * (1.0 - abar_prev) / (1.0 - abar),
        )
    }

    /// Variance of the reverse step at t: beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
    /// (fixed_small, the true posterior variance; 0 at t = 0) or beta_t (fixed_large).
    pub fn posterior_variance(&self, t: usize, kind: VarianceType) -> f64 {
        match kind {
            VarianceType::FixedSmall => {
                (1.0 - self.alpha_cumprod_prev(t)) / (1.0 - self.alphas_cumprod[t]) * self.betas[t]
            }
            VarianceType::FixedLarge => self.betas[t],
        }
    }

    /// Reads a (B,) integer timestep tensor into indices, checking the range.
    pub fn timestep_indices(&self, t: &Tensor) -> Result<Vec<usize>> {
        if t.rank() != 1 {
            bail!(
                "timesteps must have shape (B,), one per sample; got {:?}",
                t.dims()
            );
        }
        let t = t.to_device(&Device::Cpu)?;
        let raw: Vec<i64> = match t.dtype() {
            DType::U8 => t.to_vec1::<u8>()?.into_iter().map(i64::from).collect(),
            DType::U32 => t.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
            DType::I64 => t.to_vec1::<i64>()?,
            other => bail!("timesteps must be an integer tensor (u8, u32 or i64), got {other:?}"),
        };
        let n = self.num_train_timesteps() as i64;
        raw.into_iter()
            .map(|v| {
                if (0..n).contains(&v) {
                    Ok(v as usize)
                } else {
                    bail!("timestep {v} is outside the schedule's range 0..{n}")
                }
            })
            .collect()
    }

    /// Gathers `table[t_b]` for each sample into a tensor shaped (B, 1, ..., 1) with the rank,
    /// dtype and device of `like`, ready to broadcast against it.
    pub fn per_sample(&self, table: &[f64], t: &Tensor, like: &Tensor) -> Result<Tensor> {
        let idx = self.timestep_indices(t)?;
        let b = like.dim(0)?;
        if idx.len() != b {
            bail!(
                "got {} timesteps for a batch of {b} (shape {:?})",
                idx.len(),
                like.dims()
            );
        }
        let values: Vec<f64> = idx.iter().map(|&i| table[i]).collect();
        let mut shape = vec![1usize; like.rank().max(1)];
        shape[0] = b;
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(like.dtype())?
            .to_device(like.device())?)
    }

    /// sqrt(abar_t) and sqrt(1 - abar_t) per sample, shaped to broadcast against `like`.
    pub fn coefficients(&self, t: &Tensor, like: &Tensor) -> Result<Coefficients> {
        let sa: Vec<f64> = self.alphas_cumprod.iter().map(|a| a.sqrt()).collect();
        let s1: Vec<f64> = self
            .alphas_cumprod
            .iter()
            .map(|a| (1.0 - a).sqrt())
            .collect();
        Ok(Coefficients {
            sqrt_alpha_cumprod: self.per_sample(&sa, t, like)?,
            sqrt_one_minus_alpha_cumprod: self.per_sample(&s1, t, like)?,
        })
    }

    /// SNR(t_b) per sample as a (B,) f32 tensor on `device` (for loss weighting, e.g. min-SNR).
    pub fn snr_per_sample(&self, t: &Tensor, device: &Device) -> Result<Tensor> {
        let idx = self.timestep_indices(t)?;
        let v: Vec<f32> = idx.iter().map(|&i| self.snr(i) as f32).collect();
        Ok(Tensor::from_vec(v, idx.len(), &Device::Cpu)?.to_device(device)?)
    }

    /// Samples q(x_t | x_0) in closed form: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t per sample.
    pub fn q_sample(&self, x0: &Tensor, t: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let c = self.coefficients(t, x0)?;
        Ok((x0.broadcast_mul(&c.sqrt_alpha_cumprod)?
            + eps.broadcast_mul(&c.sqrt_one_minus_alpha_cumprod)?)?)
    }

    /// The v-prediction target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, t per sample.
    pub fn velocity(&self, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Result<Tensor> {
        let c = self.coefficients(t, x0)?;
        Ok((eps.broadcast_mul(&c.sqrt_alpha_cumprod)?
            - x0.broadcast_mul(&c.sqrt_one_minus_alpha_cumprod)?)?)
    }

    /// The training target for this schedule's prediction type.
    pub fn training_target(&self, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Result<Tensor> {
        match self.prediction_type {
            PredictionType::Epsilon => Ok(eps.clone()),
            PredictionType::Sample => Ok(x0.clone()),
            PredictionType::VPrediction => self.velocity(x0, eps, t),
        }
    }

    /// x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar). Infinite where abar = 0 (zero terminal SNR).
    pub fn x0_from_eps(&self, x_t: &Tensor, t: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let c = self.coefficients(t, x_t)?;
        Ok((x_t - eps.broadcast_mul(&c.sqrt_one_minus_alpha_cumprod)?)?
            .broadcast_div(&c.sqrt_alpha_cumprod)?)
    }

    /// eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar).
    pub fn eps_from_x0(&self, x_t: &Tensor, t: &Tensor, x0: &Tensor) -> Result<Tensor> {
        let c = self.coefficients(t, x_t)?;
        Ok((x_t - x0.broadcast_mul(&c.sqrt_alpha_cumprod)?)?
            .broadcast_div(&c.sqrt_one_minus_alpha_cumprod)?)
    }

    /// x0 = sqrt(abar) x_t - sqrt(1 - abar) v.
    pub fn x0_from_v(&self, x_t: &Tensor, t: &Tensor, v: &Tensor) -> Result<Tensor> {
        let c = self.coefficients(t, x_t)?;
        Ok((x_t.broadcast_mul(&c.sqrt_alpha_cumprod)?
            - v.broadcast_mul(&c.sqrt_one_minus_alpha_cumprod)?)?)
    }

    /// eps = sqrt(abar) v + sqrt(1 - abar) x_t.
    pub fn eps_from_v(&self, x_t: &Tensor, t: &Tensor, v: &Tensor) -> Result<Tensor> {
        let c = self.coefficients(t, x_t)?;
        Ok((v.broadcast_mul(&c.sqrt_alpha_cumprod)?
            + x_t.broadcast_mul(&c.sqrt_one_minus_alpha_cumprod)?)?)
    }

    /// v from x_t and eps, using x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar):
    /// v = (eps - sqrt(1 - abar) x_t) / sqrt(abar).
    pub fn v_from_eps(&self, x_t: &Tensor, t: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let c = self.coefficients(t, x_t)?;
        Ok((eps - x_t.broadcast_mul(&c.sqrt_one_minus_alpha_cumprod)?)?
            .broadcast_div(&c.sqrt_alpha_cumprod)?)
    }

    /// Converts a model output of this schedule's prediction type into (x0, eps).
    pub fn x0_and_eps(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        Ok(match self.prediction_type {
            PredictionType::Epsilon => (
                self.x0_from_eps(x_t, t, model_output)?,
                model_output.clone(),
            ),
            PredictionType::Sample => (
                model_output.clone(),
                self.eps_from_x0(x_t, t, model_output)?,
            ),
            PredictionType::VPrediction => (
                self.x0_from_v(x_t, t, model_output)?,
                self.eps_from_v(x_t, t, model_output)?,
            ),
        })
    }

    /// The posterior mean mu_tilde(x_t, x0) with t per sample.
    pub fn posterior_mean(&self, x0: &Tensor, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        let n = self.num_train_timesteps();
        let (c0, ct): (Vec<f64>, Vec<f64>) =
            (0..n).map(|i| self.posterior_mean_coefficients(i)).unzip();
        let c0 = self.per_sample(&c0, t, x_t)?;
        let ct = self.per_sample(&ct, t, x_t)?;
        Ok((x0.broadcast_mul(&c0)? + x_t.broadcast_mul(&ct)?)?)
    }
}
