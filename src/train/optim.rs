//! AdamW, gradient clipping and gradient accumulation.
//!
//! We own AdamW instead of using `candle_nn::AdamW` because a resumable run must save and restore
//! the optimizer state (step count, first and second moments), which candle keeps private. The
//! update is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments):
//!
//! ```text
//! theta <- theta * (1 - lr * weight_decay)
//! m     <- beta1 * m + (1 - beta1) * g
//! v     <- beta2 * v + (1 - beta2) * g^2
//! theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! The moments are kept in f32 whatever the parameters' dtype, so bf16/f16 weights still get
//! small updates accumulated precisely in the moments.
use anyhow::{bail, ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::Path;

/// AdamW's settings; the defaults are torch's, with diffusers' training-script weight decay.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Leave parameters of rank 0 or 1 (biases, norm scales and shifts) out of weight decay, as
    /// most LLM and many diffusion trainers do: pulling a norm's scale towards 0 is not a
    /// regulariser. diffusers' scripts decay everything, hence `false` by default.
    pub no_decay_for_biases_and_norms: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            no_decay_for_biases_and_norms: false,
        }
    }
}

/// The trainable `Var`s of a `VarMap`, sorted by name, each name prefixed (e.g. "unet.") so that
/// parameters from several models can share one optimizer without clashing.
pub fn named_vars(varmap: &VarMap, prefix: &str) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut vars: Vec<(String, Var)> = data
        .iter()
        .filter(|(_, var)| var.dtype().is_float())
        .map(|(name, var)| (format!("{prefix}{name}"), var.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Gradients of the optimizer's parameters only, in the optimizer's order (`None`: the parameter
/// got no gradient). Unlike a `GradStore`, which holds a gradient for every intermediate tensor of
/// the graph, this keeps just what the update needs, so accumulating it over micro-batches costs
/// one model's worth of memory.
#[derive(Debug, Clone)]
pub struct ParamGrads(pub Vec<Option<Tensor>>);

struct Param {
    name: String,
    var: Var,
    decay: bool,
    /// First and second moments, f32, on the parameter's device.
    m: Tensor,
    v: Tensor,
}

/// One step's AdamW factors for one parameter.
struct Update {
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// lr / (1 - beta1^t)
    step_size: f64,
    /// 1 / sqrt(1 - beta2^t)
    inv_sqrt_bias2: f64,
    /// 1 - lr * weight_decay, or 1 without decay
    shrink: f64,
}

impl Update {
    /// The new (theta, m, v) of an f32 parameter on the CPU, in one pass over theta, g, m and
    /// v: the same f32 operations in the same order as the tensor ops of [`AdamW::step`] (so
    /// the same values), which made a dozen passes over the parameter, 4-5% of a training step
    /// of the default model. `None` elsewhere (other dtypes, devices or layouts).
    fn fused_cpu(
        &self,
        theta: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        use candle_core::Storage;
        use rayon::prelude::*;
        let all = [theta, g, m, v];
        if all
            .iter()
            .any(|t| !t.device().is_cpu() || t.dtype() != DType::F32)
        {
            return Ok(None);
        }
        let guards: Vec<_> = all.iter().map(|t| t.storage_and_layout()).collect();
        let mut slices = Vec::with_capacity(4);
        for (storage, layout) in &guards {
            let (Storage::Cpu(cpu), Some((start, end))) = (&**storage, layout.contiguous_offsets())
            else {
                return Ok(None);
            };
            slices.push(&cpu.as_slice::<f32>()?[start..end]);
        }
        let n = slices[0].len();
        if slices.iter().any(|s| s.len() != n) {
            bail!("AdamW: parameter, gradient and moments differ in size")
        }
        let f = |x: f64| x as f32;
        let (b1, b2, eps) = (f(self.beta1), f(self.beta2), f(self.eps));
        let (one_b1, one_b2) = (f(1.0 - self.beta1), f(1.0 - self.beta2));
        let (step_size, inv_sqrt_bias2, shrink) =
            (f(self.step_size), f(self.inv_sqrt_bias2), f(self.shrink));
        let (mut theta2, mut m2, mut v2) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        const CHUNK: usize = 1 << 14;
        theta2.spare_capacity_mut()[..n]
            .par_chunks_mut(CHUNK)
            .zip(m2.spare_capacity_mut()[..n].par_chunks_mut(CHUNK))
            .zip(v2.spare_capacity_mut()[..n].par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(i, ((t2, m2), v2))| {
                let at = i * CHUNK..i * CHUNK + t2.len();
                let inputs = slices[0][at.clone()].iter().zip(&slices[1][at.clone()]);
                let moments = slices[2][at.clone()].iter().zip(&slices[3][at]);
                let outputs = t2.iter_mut().zip(m2.iter_mut()).zip(v2.iter_mut());
                for (((t2, m2), v2), ((&th, &g), (&m, &v))) in outputs.zip(inputs.zip(moments)) {
                    // As the tensor ops: affine(a, b) is x * a + b.
                    let m = (m * b1 + 0.0) + (g * one_b1 + 0.0);
                    let v = (v * b2 + 0.0) + ((g * g) * one_b2 + 0.0);
                    let denom = v.sqrt() * inv_sqrt_bias2 + eps;
                    let update = (m / denom) * step_size + 0.0;
                    t2.write((th * shrink + 0.0) - update);
                    m2.write(m);
                    v2.write(v);
                }
            });
        // SAFETY: the chunks above cover all n values of each, each written once.
        unsafe {
            theta2.set_len(n);
            m2.set_len(n);
            v2.set_len(n);
        }
        let shape = theta.shape();
        Ok(Some((
            Tensor::from_vec(theta2, shape, &Device::Cpu)?,
            Tensor::from_vec(m2, shape, &Device::Cpu)?,
            Tensor::from_vec(v2, shape, &Device::Cpu)?,
        )))
    }
}

pub struct AdamW {
    params: Vec<Param>,
    config: AdamWConfig,
    /// Number of updates done so far; the bias correction of the next update uses `step + 1`.
    step: u64,
}

impl AdamW {
    /// An optimizer over `vars` (name, Var), e.g. from [`named_vars`]. Names must be unique: they
    /// key the saved state.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                ensure!(
                    seen.insert(name.clone()),
                    "parameter {name} given twice to AdamW"
                );
                ensure!(
                    var.dtype().is_float(),
                    "parameter {name} is not a float tensor"
                );
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                let decay = !(config.no_decay_for_biases_and_norms && var.rank() <= 1);
                Ok(Param {
                    name,
                    var,
                    decay,
                    m: zeros.clone(),
                    v: zeros,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            config,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Updates done so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// Picks this optimizer's parameters' gradients out of a `loss.backward()` result.
    pub fn grads(&self, store: &GradStore) -> ParamGrads {
        ParamGrads(
            self.params
                .iter()
                .map(|p| store.get(p.var.as_tensor()).cloned())
                .collect(),
        )
    }

    /// Names of the parameters that got no gradient: a trainable parameter that never gets one
    /// usually means an op without a backward pass on its path.
    pub fn without_grad<'a>(&'a self, grads: &ParamGrads) -> Vec<&'a str> {
        self.params
            .iter()
            .zip(&grads.0)
            .filter(|(_, g)| g.is_none())
            .map(|(p, _)| p.name.as_str())
            .collect()
    }

    /// One AdamW update at learning rate `lr`. Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &ParamGrads, lr: f64) -> Result<()> {
        ensure!(
            grads.0.len() == self.params.len(),
            "{} gradients for {} parameters",
            grads.0.len(),
            self.params.len()
        );
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.config;
        let t = self.step as i32;
        let step_size = lr / (1.0 - beta1.powi(t));
        let inv_sqrt_bias2 = 1.0 / (1.0 - beta2.powi(t)).sqrt();
        for (p, g) in self.params.iter_mut().zip(&grads.0) {
            let Some(g) = g else { continue };
            let shrink = if p.decay {
                1.0 - lr * weight_decay
            } else {
                1.0
            };
            let update = Update {
                beta1,
                beta2,
                eps,
                step_size,
                inv_sqrt_bias2,
                shrink,
            };
            if let Some((theta, m, v)) = update.fused_cpu(p.var.as_tensor(), g, &p.m, &p.v)? {
                p.var.set(&theta)?;
                (p.m, p.v) = (m, v);
                continue;
            }
            // Detached: gradients (and the weights) carry the autograd graph that made them; a
            // moment built from them would keep every past step's graph alive.
            let g = g.detach().to_dtype(DType::F32)?;
            p.m = (p.m.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?;
            p.v = (p.v.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            let denom = p.v.sqrt()?.affine(inv_sqrt_bias2, eps)?;
            let update = (&p.m / denom)?.affine(step_size, 0.0)?;
            let theta = p.var.as_tensor().detach().to_dtype(DType::F32)?;
            let theta = (theta.affine(shrink, 0.0)? - update)?;
            p.var.set(&theta.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    /// The optimizer state as tensors ("m.NAME", "v.NAME") and metadata (the step count and the
    /// settings), for [`crate::train::save_safetensors`].
    pub fn state(&self) -> (HashMap<String, Tensor>, HashMap<String, String>) {
        let mut tensors = HashMap::new();
        for p in &self.params {
            tensors.insert(format!("m.{}", p.name), p.m.clone());
            tensors.insert(format!("v.{}", p.name), p.v.clone());
        }
        let metadata = HashMap::from([
            ("step".to_string(), self.step.to_string()),
            (
                "config".to_string(),
                serde_json::to_string(&self.config).unwrap_or_default(),
            ),
        ]);
        (tensors, metadata)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let (tensors, metadata) = self.state();
        super::save_safetensors(path, &tensors, metadata)
    }

    /// Restores the state written by [`AdamW::save`]. The file must hold a moment for every
    /// parameter of this optimizer with the same shape; settings come from this optimizer's
    /// config, not the file, so a resumed run may change e.g. the weight decay.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let device = self
            .params
            .first()
            .map(|p| p.var.device().clone())
            .unwrap_or(Device::Cpu);
        let (mut tensors, metadata) = super::load_safetensors(path, &device)?;
        let step: u64 = super::parse_metadata(&metadata, "step", path)?;
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let mut take = |kind: &str| -> Result<Tensor> {
                let key = format!("{kind}.{}", p.name);
                let t = tensors
                    .remove(&key)
                    .with_context(|| format!("{}: no optimizer state {key}", path.display()))?;
                if t.shape() != p.var.shape() {
                    bail!(
                        "{}: {key} has shape {:?}, the parameter {:?}",
                        path.display(),
                        t.shape(),
                        p.var.shape()
                    );
                }
                Ok(t.to_dtype(DType::F32)?.to_device(p.var.device())?)
            };
            restored.push((take("m")?, take("v")?));
        }
        if let Some(extra) = tensors.keys().next() {
            bail!(
                "{}: optimizer state {extra} matches no parameter of this model",
                path.display()
            );
        }
        for (p, (m, v)) in self.params.iter_mut().zip(restored) {
            p.m = m;
            p.v = v;
        }
        self.step = step;
        Ok(())
    }
}

/// Scales the gradients so that their global L2 norm (all parameters as one vector) is at most
/// `max_norm`, as `torch.nn.utils.clip_grad_norm_`, and returns the norm before clipping: the
/// number worth logging, and the one to check for NaN/Inf. Gradients are left unchanged when the
/// norm is within bounds or not finite.
pub fn clip_grad_norm(grads: &mut ParamGrads, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    // torch's clip_coef = max_norm / (norm + 1e-6), clamped to 1.
    let coef = max_norm / (norm + 1e-6);
    if norm.is_finite() && coef < 1.0 {
        for g in grads.0.iter_mut().flatten() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    Ok(norm)
}

/// The global L2 norm of the gradients. The squares are summed on the device and read back once,
/// so a GPU run syncs once per step, not once per parameter.
pub fn grad_norm(grads: &ParamGrads) -> Result<f64> {
    let mut total: Option<Tensor> = None;
    for g in grads.0.iter().flatten() {
        let sq = g.to_dtype(DType::F32)?.sqr()?.sum_all()?;
        total = Some(match total {
            Some(t) => (t + sq)?,
            None => sq,
        });
    }
    match total {
        Some(t) => Ok((t.to_scalar::<f32>()? as f64).sqrt()),
        None => Ok(0.0),
    }
}

/// Sums gradients over micro-batches and averages them, for an effective batch larger than what
/// fits in memory: with each micro-batch loss a mean over its samples, the average of the
/// micro-batch gradients is the gradient of the mean loss over all of them.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sum: Option<Vec<Option<Tensor>>>,
    count: usize,
}

impl GradAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Micro-batches added since the last [`GradAccumulator::finish`].
    pub fn count(&self) -> usize {
        self.count
    }

    pub fn add(&mut self, grads: ParamGrads) -> Result<()> {
        self.count += 1;
        let Some(sum) = &mut self.sum else {
            self.sum = Some(grads.0);
            return Ok(());
        };
        ensure!(
            sum.len() == grads.0.len(),
            "accumulating gradients of different models"
        );
        for (s, g) in sum.iter_mut().zip(grads.0) {
            *s = match (s.take(), g) {
                // The sum is detached from any graph: accumulation must not keep graphs alive.
                (Some(a), Some(b)) => Some((a + b)?.detach()),
                (a, b) => a.or(b),
            };
        }
        Ok(())
    }

    /// The mean gradient over the micro-batches added, and a fresh start for the next step.
    pub fn finish(&mut self) -> Result<ParamGrads> {
        let (Some(sum), n) = (self.sum.take(), std::mem::take(&mut self.count)) else {
            bail!("no gradients accumulated");
        };
        let scale = 1.0 / n as f64;
        let mean = sum
            .into_iter()
            .map(|g| {
                g.map(|g| if n == 1 { Ok(g) } else { g.affine(scale, 0.0) })
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(ParamGrads(mean))
    }
}
