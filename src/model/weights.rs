//! Loading and saving one component of a diffusers model directory (`unet/`, `vae/`,
//! `text_encoder/`, ...): its `config.json` and its safetensors weights under diffusers' names.
//!
//! Loading memory-maps the files and casts each tensor to the requested compute dtype when it
//! is read, so fp16/bf16 checkpoints run in f32 and the other way round. Saving writes
//! `config.json` and one safetensors file atomically (temporary file + rename), so an
//! interrupted save never leaves a half-written model that looks complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// The diffusers version our parity fixtures are made with; written into saved configs.
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// Weight file stems, in the order they are looked for: diffusers models, then transformers
/// models (text encoders).
const WEIGHT_STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

/// The default file name diffusers gives a model's weights.
pub const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// Reads and parses `dir/config.json`.
pub fn read_config<C: DeserializeOwned>(dir: &Path) -> anyhow::Result<C> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the model config {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid model config {}", path.display()))
}

/// Finds the safetensors weights of a component directory. With a `variant` (e.g. "fp16") the
/// variant files (`diffusion_pytorch_model.fp16.safetensors`, or the sharded
/// `diffusion_pytorch_model.safetensors.index.fp16.json`) are preferred; then the plain names;
/// a `*.safetensors.index.json` lists the shards.
pub fn find_weight_files(dir: &Path, variant: Option<&str>) -> anyhow::Result<Vec<PathBuf>> {
    let mut candidates: Vec<String> = Vec::new();
    if let Some(v) = variant {
        for stem in WEIGHT_STEMS {
            candidates.push(format!("{stem}.{v}.safetensors"));
            candidates.push(format!("{stem}.safetensors.index.{v}.json"));
        }
    }
    for stem in WEIGHT_STEMS {
        candidates.push(format!("{stem}.safetensors"));
        candidates.push(format!("{stem}.safetensors.index.json"));
    }
    for name in &candidates {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        if name.ends_with(".json") {
            return shard_files(&path);
        }
        return Ok(vec![path]);
    }
    let has_bin = ["diffusion_pytorch_model.bin", "pytorch_model.bin"]
        .iter()
        .any(|n| dir.join(n).is_file());
    let hint = if has_bin {
        " (only PyTorch .bin weights are there; convert them to safetensors)"
    } else {
        ""
    };
    bail!(
        "no safetensors weights in {}{hint}; looked for: {}",
        dir.display(),
        candidates.join(", ")
    )
}

/// The shard files named by a `*.safetensors.index.json` (its `weight_map` values).
fn shard_files(index: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let json: Value =
        serde_json::from_str(&text).with_context(|| format!("invalid {}", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .with_context(|| format!("{} has no weight_map", index.display()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    for f in &files {
        if !f.is_file() {
            bail!(
                "shard {} listed in {} is missing",
                f.display(),
                index.display()
            );
        }
    }
    Ok(files)
}

/// A `VarBuilder` backend over memory-mapped safetensors files whose errors name the tensor,
/// the file and both shapes.
struct SafetensorsBackend {
    files: Vec<PathBuf>,
    mmaps: Vec<MmapedSafetensors>,
    routing: HashMap<String, usize>,
}

impl SafetensorsBackend {
    fn open(files: &[PathBuf]) -> anyhow::Result<Self> {
        let mut mmaps = Vec::with_capacity(files.len());
        let mut routing = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on it
            // not being truncated while the model is alive.
            let st = unsafe { MmapedSafetensors::new(f) }
                .with_context(|| format!("cannot read safetensors file {}", f.display()))?;
            for (name, _) in st.tensors() {
                routing.insert(name, i);
            }
            mmaps.push(st);
        }
        Ok(Self {
            files: files.to_vec(),
            mmaps,
            routing,
        })
    }

    fn files_list(&self) -> String {
        self.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn view(
        &self,
        name: &str,
    ) -> candle_core::Result<(usize, safetensors::tensor::TensorView<'_>)> {
        let index = *self.routing.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "tensor `{name}` not found in {} ({} tensors): the weights do not match \
                 config.json",
                self.files_list(),
                self.routing.len()
            ))
        })?;
        Ok((index, self.mmaps[index].get(name)?))
    }
}

impl SimpleBackend for SafetensorsBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let (index, view) = self.view(name)?;
        if view.shape() != s.dims() {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` in {} has shape {:?} but config.json implies {:?}",
                self.files[index].display(),
                view.shape(),
                s.dims()
            )));
        }
        view.load(dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (_, view) = self.view(name)?;
        view.load(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }
}

/// A `VarBuilder` over safetensors files, reading tensors in `dtype` on `device`.
pub fn var_builder_from_files(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> anyhow::Result<VarBuilder<'static>> {
    let backend = SafetensorsBackend::open(files)?;
    Ok(VarBuilder::from_backend(
        Box::new(backend),
        dtype,
        device.clone(),
    ))
}

/// Loads a diffusers component directory (e.g. `model/unet`): its parsed `config.json` and a
/// `VarBuilder` over its weights in `dtype` on `device`.
///
/// ```ignore
/// let (cfg, vb) = load_component::<UNet2DConditionConfig>(&dir.join("unet"), None, DType::F32, &dev)?;
/// let unet = UNet2DConditionModel::new(vb, &cfg)?;
/// ```
pub fn load_component<C: DeserializeOwned>(
    dir: &Path,
    variant: Option<&str>,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<(C, VarBuilder<'static>)> {
    let config = read_config(dir)?;
    let files = find_weight_files(dir, variant)?;
    let vb = var_builder_from_files(&files, dtype, device)?;
    Ok((config, vb))
}

/// Overwrites every variable of `varmap` with the tensor of the same name from the component
/// directory's weights (cast to the variable's dtype): starts training from a pretrained model.
/// Nothing is changed unless every variable is present with its shape; the error lists the
/// missing and mis-shaped tensors.
pub fn load_varmap_from_component(
    varmap: &VarMap,
    dir: &Path,
    variant: Option<&str>,
) -> anyhow::Result<()> {
    let files = find_weight_files(dir, variant)?;
    let backend = SafetensorsBackend::open(&files)?;
    let vars = varmap.data().lock().unwrap();
    let mut problems = Vec::new();
    for (name, var) in vars.iter() {
        match backend.view(name) {
            Err(_) => problems.push(format!("{name} (missing)")),
            Ok((_, view)) if view.shape() != var.dims() => problems.push(format!(
                "{name} (file {:?}, model {:?})",
                view.shape(),
                var.dims()
            )),
            Ok(_) => {}
        }
    }
    if !problems.is_empty() {
        problems.sort();
        let n = problems.len();
        problems.truncate(20);
        bail!(
            "{n} of the model's {} tensors do not match {}: {}{}",
            vars.len(),
            backend.files_list(),
            problems.join(", "),
            if n > 20 { ", ..." } else { "" }
        );
    }
    for (name, var) in vars.iter() {
        let t = backend.get_unchecked(name, var.dtype(), var.device())?;
        var.set(&t)
            .with_context(|| format!("cannot set variable `{name}`"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Saving
// ---------------------------------------------------------------------------------------------

/// A diffusers `config.json` value for `config`: its fields plus `_class_name` and
/// `_diffusers_version`, which diffusers uses to pick the model class.
pub fn diffusers_config_json<C: Serialize>(class_name: &str, config: &C) -> anyhow::Result<Value> {
    let mut value = serde_json::to_value(config).context("cannot serialise the model config")?;
    let obj = value
        .as_object_mut()
        .context("a model config must serialise to a JSON object")?;
    obj.insert("_class_name".into(), Value::from(class_name));
    obj.insert("_diffusers_version".into(), Value::from(DIFFUSERS_VERSION));
    Ok(value)
}

/// Writes `tensors` as one safetensors file (metadata `format: pt`, which transformers
/// expects), via a temporary file and a rename. `dtype` casts on the way out (e.g. F16).
pub fn save_safetensors_atomic(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    dtype: Option<DType>,
) -> anyhow::Result<()> {
    let mut data: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = match dtype {
            Some(d) => t.to_dtype(d)?,
            None => t.clone(),
        };
        data.push((name.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    data.sort_by(|a, b| a.0.cmp(&b.0));
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    crate::io::with_atomic_file(path, |tmp| {
        safetensors::serialize_to_file(data, Some(metadata), tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))
    })
}

/// The current values of a `VarMap`'s variables by name.
pub fn varmap_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

/// Saves a component in diffusers layout: `dir/config.json` (with `_class_name`) and
/// `dir/diffusion_pytorch_model.safetensors` holding every variable of `varmap` under its name.
/// `dtype` optionally casts the saved weights (e.g. `Some(DType::F16)`).
pub fn save_component<C: Serialize>(
    dir: &Path,
    class_name: &str,
    config: &C,
    varmap: &VarMap,
    dtype: Option<DType>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = diffusers_config_json(class_name, config)?;
    save_safetensors_atomic(&dir.join(DIFFUSERS_WEIGHTS), &varmap_tensors(varmap), dtype)?;
    let json = serde_json::to_string_pretty(&config)?;
    crate::io::write_atomic(&dir.join("config.json"), json.as_bytes())
}
