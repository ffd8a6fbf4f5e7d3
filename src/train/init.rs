//! Seeded weight initialisation.
//!
//! candle's CPU backend draws `Init` values from an unseeded thread RNG (its `set_seed` refuses
//! the CPU), so two runs from scratch would start from different weights. This `VarBuilder`
//! backend creates each variable from a ChaCha8 stream seeded by (run seed, variable name), with
//! the same distributions as `candle_nn::Init`, so a run from scratch is reproducible on any
//! device and independent of the order the model creates its variables in.
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

/// A `VarBuilder` that creates trainable variables in `varmap`, initialised from `seed`.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededVarMap {
            varmap: varmap.clone(),
            seed,
        }),
        dtype,
        device.clone(),
    )
}

/// Values of `init` for `shape`, drawn on the host from `rng`.
pub fn sample_init(init: &Init, shape: &Shape, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n = shape.elem_count();
    let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> Vec<f32> {
        (0..n)
            .map(|_| (mean + std * rng.sample::<f64, _>(rand_distr::StandardNormal)) as f32)
            .collect()
    };
    let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(lo..up) as f32).collect()
    };
    match *init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => normal(rng, mean, stdev),
        Init::Uniform { lo, up } => uniform(rng, lo, up),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => uniform(rng, -(3f64.sqrt()) * std, 3f64.sqrt() * std),
                NormalOrUniform::Normal => normal(rng, 0.0, std),
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self.varmap.data().lock().unwrap();
        if let Some(var) = data.get(name) {
            if var.shape() != &shape {
                candle_core::bail!("shape mismatch on {name}: {shape:?} <> {:?}", var.shape());
            }
            return Ok(var.as_tensor().clone());
        }
        let mut hash = crate::train::Fnv1a::new();
        hash.update(name.as_bytes());
        let mut rng =
            ChaCha8Rng::seed_from_u64(crate::train::mix_seed(self.seed, hash.finish(), 0));
        let values = sample_init(&init, &shape, &mut rng);
        let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: a seeded VarMap creates variables with a shape; use `get`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().unwrap().contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_and_the_distributions_hold() {
        let build = |seed| {
            let vm = VarMap::new();
            let vb = seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
            let w = vb
                .get_with_hints((256, 64), "w", candle_nn::init::DEFAULT_KAIMING_NORMAL)
                .unwrap();
            let b = vb.get_with_hints(64, "b", Init::Const(0.5)).unwrap();
            (
                w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.to_vec1::<f32>().unwrap(),
            )
        };
        let (w1, b1) = build(7);
        let (w2, _) = build(7);
        let (w3, _) = build(8);
        assert_eq!(w1, w2);
        assert_ne!(w1, w3);
        assert!(b1.iter().all(|&v| v == 0.5));
        // Kaiming normal, fan-in 64, ReLU gain sqrt(2): std = sqrt(2 / 64) = 0.177.
        let var = w1.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / w1.len() as f64;
        assert!(
            (var.sqrt() - (2.0f64 / 64.0).sqrt()).abs() < 0.01,
            "std {}",
            var.sqrt()
        );
    }
}
