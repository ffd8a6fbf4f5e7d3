//! An exponential moving average (EMA) of the weights, as diffusers' `EMAModel`.
//!
//! After each optimizer step, `shadow <- shadow - (1 - decay) * (shadow - param)`. The decay
//! ramps up from 0 so that the average is not dominated by the random initial weights:
//!
//! ```text
//! s     = optimization_step - update_after_step - 1        (the first update copies: decay 0)
//! decay = (1 + s) / (10 + s)                  (Warmup::Ramp, diffusers' default)
//!       | 1 - (1 + s / inv_gamma)^(-power)    (Warmup::Power, diffusers' use_ema_warmup)
//!       | max_decay                           (Warmup::None)
//! decay = clamp(decay, min_decay, max_decay), and 0 while s <= 0
//! ```
//!
//! The averaged weights are what a run usually ships: save them with [`Ema::save`] (a safetensors
//! file with the model's own tensor names, loadable as weights) or put them in a `VarMap` with
//! [`Ema::copy_to`] / [`Ema::to_varmap`] to sample from them.
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum EmaWarmup {
    /// Constant decay (after the first update, which copies the weights).
    None,
    /// decay = (1 + s) / (10 + s): diffusers' EMAModel without `use_ema_warmup`.
    Ramp,
    /// decay = 1 - (1 + s / inv_gamma)^(-power): diffusers' `use_ema_warmup`. power 2/3 suits
    /// runs of about 1M steps, 3/4 shorter ones (diffusers' advice).
    Power { inv_gamma: f64, power: f64 },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct EmaConfig {
    /// The decay the warmup ramps up to (diffusers' `decay`).
    pub max_decay: f64,
    pub min_decay: f64,
    /// Optimizer steps before the average starts following the weights.
    pub update_after_step: u64,
    pub warmup: EmaWarmup,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            max_decay: 0.9999,
            min_decay: 0.0,
            update_after_step: 0,
            warmup: EmaWarmup::Ramp,
        }
    }
}

impl EmaConfig {
    /// The decay used by the `optimization_step`-th update (1 for the first).
    pub fn decay(&self, optimization_step: u64) -> f64 {
        let s = optimization_step.saturating_sub(self.update_after_step + 1);
        if s == 0 {
            return 0.0;
        }
        let s = s as f64;
        let decay = match self.warmup {
            EmaWarmup::None => self.max_decay,
            EmaWarmup::Ramp => (1.0 + s) / (10.0 + s),
            EmaWarmup::Power { inv_gamma, power } => 1.0 - (1.0 + s / inv_gamma).powf(-power),
        };
        decay.min(self.max_decay).max(self.min_decay)
    }
}

pub struct Ema {
    config: EmaConfig,
    /// (name, shadow) sorted by name; the shadow is f32 on the parameter's device.
    shadow: Vec<(String, Tensor)>,
    optimization_step: u64,
}

impl Ema {
    /// An average starting at the current weights of `vars` (name, Var), e.g. from
    /// [`crate::train::optim::named_vars`] with an empty prefix so the names stay diffusers'.
    pub fn new(vars: &[(String, Var)], config: EmaConfig) -> Result<Self> {
        let mut shadow = vars
            .iter()
            .map(|(name, var)| {
                Ok((
                    name.clone(),
                    var.as_tensor().detach().to_dtype(DType::F32)?.copy()?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        shadow.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self {
            config,
            shadow,
            optimization_step: 0,
        })
    }

    pub fn config(&self) -> &EmaConfig {
        &self.config
    }

    /// Updates done so far.
    pub fn optimization_step(&self) -> u64 {
        self.optimization_step
    }

    /// Folds the current weights into the average; call once after each optimizer step, with the
    /// same names given to [`Ema::new`]. Returns the decay used.
    pub fn update(&mut self, vars: &[(String, Var)]) -> Result<f64> {
        ensure!(
            vars.len() == self.shadow.len(),
            "EMA of {} tensors updated with {}",
            self.shadow.len(),
            vars.len()
        );
        self.optimization_step += 1;
        let decay = self.config.decay(self.optimization_step);
        let by_name: HashMap<&str, &Var> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
        for (name, shadow) in &mut self.shadow {
            let var = by_name
                .get(name.as_str())
                .with_context(|| format!("EMA: no weight {name}"))?;
            // Detached, or each new average would hold the graph of every update before it.
            let param = var.as_tensor().detach().to_dtype(DType::F32)?;
            // shadow - (1 - decay) * (shadow - param) = decay * shadow + (1 - decay) * param
            *shadow = (shadow.affine(decay, 0.0)? + param.affine(1.0 - decay, 0.0)?)?;
        }
        Ok(decay)
    }

    /// The averaged weights by name, in `dtype`.
    pub fn weights(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        self.shadow
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.to_dtype(dtype)?)))
            .collect()
    }

    /// Writes the averaged weights into the matching `Var`s of `varmap` (names without prefix),
    /// e.g. to sample with them; every averaged tensor must be in the map.
    pub fn copy_to(&self, varmap: &VarMap) -> Result<()> {
        let data = varmap.data().lock().expect("VarMap lock poisoned");
        for (name, shadow) in &self.shadow {
            let var = data
                .get(name)
                .with_context(|| format!("EMA weight {name} not in the model"))?;
            var.set(&shadow.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// A new `VarMap` holding the averaged weights in `dtype` (a copy: training weights untouched),
    /// to build a model from with `VarBuilder::from_varmap`, or to save as the output.
    pub fn to_varmap(&self, dtype: DType) -> Result<VarMap> {
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("VarMap lock poisoned");
            for (name, shadow) in &self.shadow {
                data.insert(name.clone(), Var::from_tensor(&shadow.to_dtype(dtype)?)?);
            }
        }
        Ok(varmap)
    }

    /// Saves the averaged weights under their own names (so the file loads as plain weights) with
    /// the step count in the metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self.shadow.iter().cloned().collect();
        let metadata = HashMap::from([
            (
                "ema_optimization_step".to_string(),
                self.optimization_step.to_string(),
            ),
            (
                "ema_config".to_string(),
                serde_json::to_string(&self.config)?,
            ),
        ]);
        super::save_safetensors(path, &tensors, metadata)
    }

    /// Restores an average saved by [`Ema::save`]; it must hold exactly this average's tensors.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let device = self
            .shadow
            .first()
            .map(|(_, t)| t.device().clone())
            .unwrap_or(Device::Cpu);
        let (mut tensors, metadata) = super::load_safetensors(path, &device)?;
        let step: u64 = super::parse_metadata(&metadata, "ema_optimization_step", path)?;
        let mut restored = Vec::with_capacity(self.shadow.len());
        for (name, old) in &self.shadow {
            let t = tensors
                .remove(name)
                .with_context(|| format!("{}: no EMA weight {name}", path.display()))?;
            ensure!(
                t.shape() == old.shape(),
                "{}: EMA weight {name} has shape {:?}, the model {:?}",
                path.display(),
                t.shape(),
                old.shape()
            );
            restored.push(t.to_dtype(DType::F32)?);
        }
        if let Some(extra) = tensors.keys().next() {
            bail!(
                "{}: EMA weight {extra} matches no weight of this model",
                path.display()
            );
        }
        for ((_, shadow), t) in self.shadow.iter_mut().zip(restored) {
            *shadow = t;
        }
        self.optimization_step = step;
        Ok(())
    }
}
