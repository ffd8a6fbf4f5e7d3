//! Loading and saving one component of a diffusers model directory (`unet/`, `vae/`,
//! `text_encoder/`, ...): its `config.json` and its safetensors weights under diffusers' names.
//!
//! Loading uses each tensor where it lies in the memory-mapped file when it can (see
//! [`crate::mapped`]), else reads it with a positioned read, and casts it to the requested
//! compute dtype, so fp16/bf16 checkpoints run in f32 and the other way round. Saving writes
//! `config.json` and one safetensors file atomically (temporary file + rename), so an
//! interrupted save never leaves a half-written model that looks complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
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

/// One safetensors file: the JSON header is parsed once, and each tensor's buffer is either the
/// tensor's own bytes in the file's private memory map (no copy, nothing read until it is
/// used: [`crate::mapped`]) or, where that is not possible, a fresh buffer filled by a
/// positioned read.
///
/// Why not candle's `MmapedSafetensors`: candle's CPU tensors own their memory, so it copies
/// each tensor out of the map, and every page touched through the map stays in the process's
/// resident set until the map is dropped: loading a 4.3 GB model peaked at 6.9 GiB RSS.
/// Adopted buffers are the map's pages themselves, and freeing one discards its pages.
struct WeightFile {
    path: PathBuf,
    file: std::fs::File,
    /// The file's private mapping, when the global allocator can own buffers inside it.
    map: Option<crate::mapped::MappedFile>,
    /// Tensors whose bytes have been handed out from `map`: a second request for the same
    /// tensor gets a copy, as two buffers must never share memory.
    adopted: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Offset of the data section (after the 8-byte length and the header).
    data_start: u64,
    file_len: u64,
    metadata: safetensors::tensor::Metadata,
}

impl WeightFile {
    fn open(path: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot read safetensors file {}", path.display()))?;
        let file_len = file.metadata()?.len();
        let not_safetensors = || {
            anyhow::anyhow!(
                "{} is not a safetensors file (its header is damaged or it is truncated)",
                path.display()
            )
        };
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0)
            .map_err(|_| not_safetensors())?;
        let header_len = u64::from_le_bytes(len);
        if header_len > 100_000_000 || header_len + 8 > file_len {
            return Err(not_safetensors());
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)?;
        let metadata: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| not_safetensors().context(e))?;
        Ok(Self {
            path: path.to_path_buf(),
            map: crate::mapped::MappedFile::map(&file, file_len),
            adopted: Default::default(),
            file,
            data_start: 8 + header_len,
            file_len,
            metadata,
        })
    }

    fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.metadata.info(name).map(|i| i.shape.as_slice())
    }

    /// Reads tensor `name` (which must be in this file) onto `device`, in the file's dtype.
    fn read(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        use safetensors::Dtype as D;
        let info = self.metadata.info(name).expect("routed to this file");
        let shape = info.shape.as_slice();
        let (start, end) = info.data_offsets;
        let dtype = match info.dtype {
            D::F64 => DType::F64,
            D::F32 => DType::F32,
            D::F16 => DType::F16,
            D::BF16 => DType::BF16,
            D::I64 => DType::I64,
            D::U32 => DType::U32,
            D::U8 => DType::U8,
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "tensor `{name}` in {} has dtype {other:?}, which sd-rs does not read",
                    self.path.display()
                )))
            }
        };
        let numel: usize = shape.iter().product();
        let offset = self.data_start + start as u64;
        if end - start != numel * dtype.size_in_bytes()
            || offset + (end - start) as u64 > self.file_len
        {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` in {} does not fit its shape {shape:?} and dtype, or the file \
                 is truncated",
                self.path.display()
            )));
        }
        let first_use = self.adopted.lock().unwrap().insert(name.to_string());
        let map = self.map.as_ref().filter(|_| first_use);
        match dtype {
            DType::F64 => self.read_as::<f64>(map, offset, numel, shape, device),
            DType::F32 => self.read_as::<f32>(map, offset, numel, shape, device),
            DType::F16 => self.read_as::<half::f16>(map, offset, numel, shape, device),
            DType::BF16 => self.read_as::<half::bf16>(map, offset, numel, shape, device),
            DType::I64 => self.read_as::<i64>(map, offset, numel, shape, device),
            DType::U32 => self.read_as::<u32>(map, offset, numel, shape, device),
            _ => self.read_as::<u8>(map, offset, numel, shape, device),
        }
    }

    /// The tensor's values from `map` without a copy when they can be adopted from it (aligned
    /// and not empty), else read from the file.
    fn read_as<T: candle_core::WithDType>(
        &self,
        map: Option<&crate::mapped::MappedFile>,
        offset: u64,
        numel: usize,
        shape: &[usize],
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        use std::os::unix::fs::FileExt;
        // safetensors is little-endian, as every platform sd-rs builds for.
        const _: () = assert!(cfg!(target_endian = "little"));
        if let Some(values) = map.and_then(|m| m.adopt::<T>(offset as usize, numel)) {
            return Tensor::from_vec(values, shape, device);
        }
        let mut values = vec![T::zero(); numel];
        // SAFETY: the bytes of initialised plain numbers; every bit pattern is a valid T.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                values.as_mut_ptr() as *mut u8,
                numel * std::mem::size_of::<T>(),
            )
        };
        self.file.read_exact_at(bytes, offset).map_err(|e| {
            candle_core::Error::Msg(format!("cannot read {}: {e}", self.path.display()))
        })?;
        Tensor::from_vec(values, shape, device)
    }
}

/// A `VarBuilder` backend over safetensors files (one, or the shards of a model) whose errors
/// name the tensor, the file and both shapes.
struct SafetensorsBackend {
    files: Vec<WeightFile>,
    routing: HashMap<String, usize>,
    /// Tensors read ahead by [`Self::prefetch`], handed out (and dropped from here) by `get`.
    prefetched: std::sync::Mutex<HashMap<String, Tensor>>,
}

impl SafetensorsBackend {
    fn open(paths: &[PathBuf]) -> anyhow::Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = WeightFile::open(path)?;
            for name in file.names() {
                routing.insert(name, i);
            }
            files.push(file);
        }
        Ok(Self {
            files,
            routing,
            prefetched: Default::default(),
        })
    }

    /// Gets every tensor now, on all cores. Tensors used where they lie in the map cost
    /// nothing here; the rest are bound by the kernel copying file pages into freshly faulted
    /// memory, which one thread does at ~2 GB/s, and the model constructors ask for tensors one
    /// at a time, so the reads and casts are done ahead of them.
    /// They are cast to `dtype` as they are read, so the peak is the weights once in the
    /// compute dtype (an f16 file loaded in f32 never holds both copies whole).
    fn prefetch(&self, device: &Device, dtype: DType) {
        use rayon::prelude::*;
        let names: Vec<(&String, usize)> = self.routing.iter().map(|(n, &i)| (n, i)).collect();
        // A tensor that cannot be read is left out here: if the model asks for it, `get` reads
        // it again and reports the error then.
        let tensors: HashMap<String, Tensor> = names
            .par_iter()
            .filter_map(|&(name, i)| {
                let t = self.files[i]
                    .read(name, device)
                    .and_then(|t| t.to_dtype(dtype));
                Some((name.clone(), t.ok()?))
            })
            .collect();
        *self.prefetched.lock().unwrap() = tensors;
    }

    /// Tensor `name` of `file`, from the read-ahead when there is one.
    fn read(&self, file: &WeightFile, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let ahead = self.prefetched.lock().unwrap().remove(name);
        match ahead {
            Some(t) => Ok(t),
            None => file.read(name, dev),
        }
    }

    fn files_list(&self) -> String {
        self.files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The file holding `name`, or an error saying the weights do not match the config.
    fn file_of(&self, name: &str) -> candle_core::Result<&WeightFile> {
        let index = *self.routing.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "tensor `{name}` not found in {} ({} tensors): the weights do not match \
                 config.json",
                self.files_list(),
                self.routing.len()
            ))
        })?;
        Ok(&self.files[index])
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
        let file = self.file_of(name)?;
        let shape = file.shape(name).unwrap_or_default();
        if shape != s.dims() {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` in {} has shape {shape:?} but config.json implies {:?}",
                file.path.display(),
                s.dims()
            )));
        }
        self.read(file, name, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(self.file_of(name)?, name, dev)?.to_dtype(dtype)
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
    if device.is_cpu() {
        backend.prefetch(device, dtype);
    }
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
        match backend.file_of(name).ok().and_then(|f| f.shape(name)) {
            None => problems.push(format!("{name} (missing)")),
            Some(shape) if shape != var.dims() => {
                problems.push(format!("{name} (file {shape:?}, model {:?})", var.dims()))
            }
            Some(_) => {}
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
