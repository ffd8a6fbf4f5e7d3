//! The CLIP text encoder trains: built on a `VarMap`, a loss through the whole encoder gives
//! every parameter a finite, non-zero gradient (candle's fused LayerNorm/softmax would silently
//! give none), and the gradients agree with central finite differences in f64.
//!
//! Legitimate zeros, checked as such: the attention key bias (softmax is shift-invariant), rows
//! of the token table whose token is not in the batch, and rows of the position table beyond
//! the sequence length.

use anyhow::Result;
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use sd_rs::model::clip::{ClipTextConfig, ClipTextModel, ContextLayer};

fn tiny_config(act: &str, projection: bool, max_positions: usize) -> ClipTextConfig {
    let arch = if projection {
        "CLIPTextModelWithProjection"
    } else {
        "CLIPTextModel"
    };
    serde_json::from_value(serde_json::json!({
        "vocab_size": 12, "hidden_size": 8, "intermediate_size": 16, "projection_dim": 6,
        "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": max_positions,
        "hidden_act": act, "bos_token_id": 10, "eos_token_id": 11, "pad_token_id": 11,
        "architectures": [arch]
    }))
    .unwrap()
}

/// Ids using tokens 0..=5 and 10, 11 (6..=9 never appear), EOS at different positions.
fn ids(len: usize) -> Result<Tensor> {
    let a = [10u32, 0, 1, 2, 11, 11, 11];
    let b = [10u32, 3, 4, 5, 1, 0, 11];
    let flat: Vec<u32> = a[..len].iter().chain(&b[..len]).copied().collect();
    Ok(Tensor::from_vec(flat, (2, len), &Device::Cpu)?)
}

/// A loss that reads every output a pipeline or trainer uses: the U-Net context (all positions),
/// the pooled / projected embedding, and the penultimate state SDXL uses.
fn loss(model: &ClipTextModel, ids: &Tensor) -> Result<Tensor> {
    let out = model.forward(ids)?;
    let weigh = |t: &Tensor, seed: f64| -> Result<Tensor> {
        // Fixed, non-uniform weights so no gradient cancels by symmetry.
        let n = t.elem_count();
        let w: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.7 + seed).sin()).collect();
        let w = Tensor::from_vec(w, t.shape(), t.device())?.to_dtype(t.dtype())?;
        Ok((t * w)?.sum_all()?)
    };
    let mut total = weigh(&out.last_hidden_state, 0.1)?;
    total = (total + weigh(&out.pooled, 0.2)?)?;
    if let Some(te) = &out.text_embeds {
        total = (total + weigh(te, 0.3)?)?;
    }
    let penultimate = model.select_context(&out, ContextLayer::Penultimate { clip_skip: 0 })?;
    total = (total + weigh(&penultimate, 0.4)?)?;
    Ok(total)
}

/// A fresh model on a `VarMap`, as the trainer builds it. candle's CPU initialisation cannot be
/// seeded, so the values are then overwritten from a seeded RNG (non-zero biases, LayerNorm
/// weights around 1) to keep the test deterministic.
fn build(cfg: &ClipTextConfig, dtype: DType) -> Result<(VarMap, ClipTextModel)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let model = ClipTextModel::new(vb, cfg)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for (name, var) in sorted_vars(&varmap) {
        let (mean, std) = if name.contains("layer_norm") && name.ends_with("weight") {
            (1.0, 0.1)
        } else if name.ends_with("bias") {
            (0.0, 0.1)
        } else {
            (0.0, 0.4)
        };
        let normal = Normal::new(mean, std)?;
        let values: Vec<f64> = (0..var.elem_count())
            .map(|_| normal.sample(&mut rng))
            .collect();
        var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?.to_dtype(dtype)?)?;
    }
    Ok((varmap, model))
}

fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap();
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Max |grad| per row of a 2-D gradient.
fn row_max(grad: &Tensor) -> Result<Vec<f64>> {
    Ok(grad.to_dtype(DType::F64)?.abs()?.max(1)?.to_vec1::<f64>()?)
}

fn check_every_parameter_gets_a_gradient(act: &str, projection: bool) -> Result<()> {
    let cfg = tiny_config(act, projection, 7);
    let (varmap, model) = build(&cfg, DType::F32)?;
    let grads: GradStore = loss(&model, &ids(7)?)?.backward()?;
    let vars = sorted_vars(&varmap);
    // 2 embeddings + 2 x 16 per layer + final norm 2 (+ projection).
    assert_eq!(vars.len(), 2 + 2 * 16 + 2 + projection as usize);
    let mut missing = Vec::new();
    for (name, var) in &vars {
        match grads.get(var.as_tensor()) {
            None => missing.push(format!("{name}: no gradient")),
            Some(g) => {
                let g = g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                if g.iter().any(|v| !v.is_finite()) {
                    missing.push(format!("{name}: non-finite gradient"));
                } else {
                    let max = g.iter().fold(0f64, |m, v| m.max(v.abs()));
                    if name.ends_with("k_proj.bias") {
                        // The key bias adds q_i . b to every score of query i: the softmax is
                        // blind to it, so its true gradient is 0 (PyTorch's too). It must still
                        // be connected to the graph (candle's fused softmax would cut it off).
                        if max > 1e-5 {
                            missing.push(format!("{name}: gradient {max:e} should be ~0"));
                        }
                    } else if max < 1e-3 {
                        missing.push(format!("{name}: (near) zero gradient {max:e}"));
                    }
                }
            }
        }
    }
    println!(
        "{act}, projection {projection}: {} parameters, {} without a gradient",
        vars.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "parameters without a usable gradient: {missing:#?}"
    );

    // Rows of the token table get a gradient exactly when their token appears in the batch.
    let table =
        varmap.data().lock().unwrap()["text_model.embeddings.token_embedding.weight"].clone();
    let per_row = row_max(grads.get(table.as_tensor()).unwrap())?;
    for (id, m) in per_row.iter().enumerate() {
        let used = !(6..=9).contains(&id);
        assert_eq!(*m > 0.0, used, "token {id}: row gradient {m}");
    }
    Ok(())
}

#[test]
fn every_parameter_gets_a_gradient_quick_gelu() -> Result<()> {
    check_every_parameter_gets_a_gradient("quick_gelu", false)
}

#[test]
fn every_parameter_gets_a_gradient_gelu_with_projection() -> Result<()> {
    check_every_parameter_gets_a_gradient("gelu", true)
}

#[test]
fn unused_positions_get_no_gradient() -> Result<()> {
    // Sequences shorter than max_position_embeddings never read the last rows of the position
    // table: those rows legitimately get zero gradient (diffusers always pads to 77, so with
    // CLIP's 77 positions every row is used).
    let cfg = tiny_config("quick_gelu", false, 7);
    let (varmap, model) = build(&cfg, DType::F32)?;
    let grads = loss(&model, &ids(5)?)?.backward()?;
    let pos =
        varmap.data().lock().unwrap()["text_model.embeddings.position_embedding.weight"].clone();
    let per_row = row_max(grads.get(pos.as_tensor()).unwrap())?;
    println!("position rows max |grad|: {per_row:?}");
    assert!(per_row[..5].iter().all(|&m| m > 0.0));
    assert!(per_row[5..].iter().all(|&m| m == 0.0));
    Ok(())
}

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    for (act, projection) in [("quick_gelu", false), ("gelu", true)] {
        let cfg = tiny_config(act, projection, 7);
        let (varmap, model) = build(&cfg, DType::F64)?;
        let ids = ids(7)?;
        let grads = loss(&model, &ids)?.backward()?;
        let h = 1e-5;
        let (mut checked, mut worst) = (0, 0f64);
        for (name, var) in sorted_vars(&varmap) {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"))
                .flatten_all()?
                .to_vec1::<f64>()?;
            let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
            // Three entries per tensor, spread over it; for the token table, rows that are used.
            let n = base.len();
            for k in [0, n / 2, n - 1] {
                let k = if name.contains("token_embedding") {
                    k.min(6 * 8 - 1)
                } else {
                    k
                };
                let eval = |delta: f64| -> Result<f64> {
                    let mut v = base.clone();
                    v[k] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
                    Ok(loss(&model, &ids)?.to_scalar::<f64>()?)
                };
                let fd = (eval(h)? - eval(-h)?) / (2.0 * h);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu)?)?;
                let err = (fd - grad[k]).abs() / (1e-3 + grad[k].abs());
                worst = worst.max(err);
                checked += 1;
                assert!(
                    err < 1e-4,
                    "{act}: {name}[{k}]: autograd {} vs finite difference {fd}",
                    grad[k]
                );
            }
        }
        println!("{act}: {checked} entries checked, worst relative error {worst:.2e}");
    }
    Ok(())
}
