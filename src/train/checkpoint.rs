//! Training checkpoints that survive being killed at any moment, for `--resume`.
//!
//! A checkpoint is a directory `ROOT/checkpoint-STEP` (diffusers' naming) holding:
//!
//! ```text
//! NAME.safetensors         the weights of each trained model (e.g. unet), diffusers' names
//! optimizer.safetensors    AdamW's moments and step count
//! ema.safetensors          the EMA weights, when the run keeps an EMA
//! state.json               step, RNG state, data position, the run's config, and the size of
//!                          every file above (checked on load)
//! ```
//!
//! It is written into `ROOT/.tmp-checkpoint-STEP-PID`, flushed to disk, and renamed into place:
//! a rename is atomic, so a directory named `checkpoint-STEP` is always complete, and a kill
//! mid-write leaves only a temporary directory, which the next save sweeps away. Old checkpoints
//! beyond the last `keep_last` are renamed aside before they are deleted, for the same reason.
//! Loading takes the newest checkpoint that passes its checks and falls back to older ones.
use crate::train::data::DataPosition;
use crate::train::ema::Ema;
use crate::train::optim::AdamW;
use crate::train::{load_safetensors, save_safetensors};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
const FORMAT_VERSION: u32 = 1;
const PREFIX: &str = "checkpoint-";
const TEMP_PREFIX: &str = ".tmp-";

/// The exact state of a ChaCha8 generator: seed, stream and position in the stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    /// The 32-byte key, hex.
    pub seed: String,
    pub stream: u64,
    /// Position in 32-bit words; a string because JSON numbers cannot hold a u128.
    pub word_pos: String,
}

impl RngState {
    pub fn capture(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    pub fn restore(&self) -> Result<ChaCha8Rng> {
        ensure!(
            self.seed.len() == 64,
            "RNG seed {:?} is not 32 hex bytes",
            self.seed
        );
        let mut seed = [0u8; 32];
        for (i, byte) in seed.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16)
                .with_context(|| format!("RNG seed {:?} is not hex", self.seed))?;
        }
        let word_pos: u128 = self
            .word_pos
            .parse()
            .with_context(|| format!("RNG position {:?}", self.word_pos))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(word_pos);
        Ok(rng)
    }
}

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// The run's RNG (timesteps, noise) after the last step.
    pub rng: RngState,
    /// The data position after the last batch trained on.
    pub data: DataPosition,
    /// The configuration the run was started with, to compare against on resume.
    pub config: serde_json::Value,
}

/// The tensors of a checkpoint.
pub struct CheckpointParts<'a> {
    /// (name, weights): each written to `NAME.safetensors` with the map's own tensor names.
    pub weights: Vec<(&'a str, &'a VarMap)>,
    pub optimizer: &'a AdamW,
    pub ema: Option<&'a Ema>,
}

/// state.json as written: the state plus what makes a checkpoint checkable.
#[derive(serde::Serialize, serde::Deserialize)]
struct StateFile {
    format_version: u32,
    #[serde(flatten)]
    state: TrainState,
    /// Size in bytes of every other file of the checkpoint.
    files: BTreeMap<String, u64>,
}

/// The checkpoints of one run, in one directory.
pub struct Checkpoints {
    root: PathBuf,
    keep_last: usize,
}

impl Checkpoints {
    /// Checkpoints under `root`, keeping the newest `keep_last` (at least 1) when saving.
    pub fn new(root: &Path, keep_last: usize) -> Self {
        Self {
            root: root.to_path_buf(),
            keep_last: keep_last.max(1),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes a checkpoint for `state.step` and returns its directory. Older checkpoints beyond
    /// `keep_last` are deleted once it is in place.
    pub fn save(&self, state: &TrainState, parts: &CheckpointParts) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("creating checkpoint directory {}", self.root.display()))?;
        self.remove_temporaries()?;
        let name = format!("{PREFIX}{}", state.step);
        let tmp = self
            .root
            .join(format!("{TEMP_PREFIX}{name}-{}", std::process::id()));
        std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;

        let mut files = Vec::new();
        for (weights_name, varmap) in &parts.weights {
            let file = format!("{weights_name}.safetensors");
            save_varmap(&tmp.join(&file), varmap)?;
            files.push(file);
        }
        parts.optimizer.save(&tmp.join(OPTIMIZER_FILE))?;
        files.push(OPTIMIZER_FILE.to_string());
        if let Some(ema) = parts.ema {
            ema.save(&tmp.join(EMA_FILE))?;
            files.push(EMA_FILE.to_string());
        }
        let sizes = files
            .iter()
            .map(|f| Ok((f.clone(), std::fs::metadata(tmp.join(f))?.len())))
            .collect::<Result<BTreeMap<_, _>>>()?;
        let state_file = StateFile {
            format_version: FORMAT_VERSION,
            state: state.clone(),
            files: sizes,
        };
        std::fs::write(
            tmp.join(STATE_FILE),
            serde_json::to_string_pretty(&state_file)?,
        )
        .with_context(|| format!("writing {}", tmp.join(STATE_FILE).display()))?;

        // Flush contents before the rename publishes them, so a power cut cannot publish a
        // directory of empty files.
        for file in files.iter().map(String::as_str).chain([STATE_FILE]) {
            sync_path(&tmp.join(file))?;
        }
        sync_dir(&tmp);
        let dir = self.root.join(&name);
        if dir.exists() {
            // Only when a run resumed from an older checkpoint reaches this step again.
            self.remove_dir_safely(&dir)?;
        }
        std::fs::rename(&tmp, &dir)
            .with_context(|| format!("moving {} to {}", tmp.display(), dir.display()))?;
        sync_dir(&self.root);

        let complete = self.list()?;
        let excess = complete.len().saturating_sub(self.keep_last);
        for (_, old) in complete.into_iter().take(excess) {
            self.remove_dir_safely(&old)?;
        }
        Ok(dir)
    }

    /// Complete checkpoint directories (by name; not yet checked), oldest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut found = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.root.display())),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(step) = name
                .strip_prefix(PREFIX)
                .and_then(|s| s.parse::<u64>().ok())
            {
                if entry.file_type()?.is_dir() {
                    found.push((step, entry.path()));
                }
            }
        }
        found.sort();
        Ok(found)
    }

    /// The newest checkpoint that passes its checks, and why any newer ones were passed over.
    pub fn latest(&self) -> Result<LatestCheckpoint> {
        let mut rejected = Vec::new();
        for (_, dir) in self.list()?.into_iter().rev() {
            match Checkpoint::open(&dir) {
                Ok(checkpoint) => {
                    return Ok(LatestCheckpoint {
                        found: Some(checkpoint),
                        rejected,
                    })
                }
                Err(e) => rejected.push(format!("{e:#}")),
            }
        }
        Ok(LatestCheckpoint {
            found: None,
            rejected,
        })
    }

    /// Removes what interrupted saves and deletions left behind.
    fn remove_temporaries(&self) -> Result<()> {
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                let path = entry.path();
                let removed = if entry.file_type()?.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed.with_context(|| format!("removing {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Renames `dir` to a temporary name before deleting it, so a kill mid-deletion never leaves
    /// a half-deleted directory under a checkpoint's name.
    fn remove_dir_safely(&self, dir: &Path) -> Result<()> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let doomed = self
            .root
            .join(format!("{TEMP_PREFIX}delete-{name}-{}", std::process::id()));
        std::fs::rename(dir, &doomed)
            .with_context(|| format!("moving {} aside to delete it", dir.display()))?;
        std::fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))
    }
}

pub struct LatestCheckpoint {
    pub found: Option<Checkpoint>,
    /// Newer checkpoints that failed their checks, with why.
    pub rejected: Vec<String>,
}

/// A checkpoint on disk whose state.json read and whose files are all there.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
    files: BTreeMap<String, u64>,
}

impl Checkpoint {
    /// Reads `dir`'s state.json and checks every file it lists is there with its size.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let file: StateFile =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        ensure!(
            file.format_version == FORMAT_VERSION,
            "{}: checkpoint format {} (this sd-rs reads {FORMAT_VERSION})",
            path.display(),
            file.format_version
        );
        for (name, size) in &file.files {
            let actual = std::fs::metadata(dir.join(name))
                .with_context(|| format!("checkpoint {}: {name} is missing", dir.display()))?
                .len();
            ensure!(
                actual == *size,
                "checkpoint {}: {name} has {actual} bytes, {size} were written",
                dir.display()
            );
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            state: file.state,
            files: file.files,
        })
    }

    pub fn has_ema(&self) -> bool {
        self.files.contains_key(EMA_FILE)
    }

    /// Sets the `Var`s of `varmap` to the checkpoint's weights `NAME.safetensors`.
    pub fn load_weights(&self, name: &str, varmap: &VarMap) -> Result<()> {
        load_varmap(&self.dir.join(format!("{name}.safetensors")), varmap)
    }

    pub fn load_optimizer(&self, optimizer: &mut AdamW) -> Result<()> {
        optimizer.load(&self.dir.join(OPTIMIZER_FILE))
    }

    pub fn load_ema(&self, ema: &mut Ema) -> Result<()> {
        ensure!(
            self.has_ema(),
            "checkpoint {} has no EMA weights",
            self.dir.display()
        );
        ema.load(&self.dir.join(EMA_FILE))
    }
}

/// Saves a `VarMap`'s tensors under their own (diffusers) names, with the "format": "pt" metadata
/// that transformers and diffusers look for.
pub fn save_varmap(path: &Path, varmap: &VarMap) -> Result<()> {
    let tensors: HashMap<String, Tensor> = {
        let data = varmap.data().lock().expect("VarMap lock poisoned");
        data.iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect()
    };
    save_safetensors(
        path,
        &tensors,
        HashMap::from([("format".to_string(), "pt".to_string())]),
    )
}

/// Sets every `Var` of `varmap` from the file, which must hold each one with the same shape (the
/// dtype is converted).
pub fn load_varmap(path: &Path, varmap: &VarMap) -> Result<()> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let device = data
        .values()
        .next()
        .map(|v| v.device().clone())
        .unwrap_or(Device::Cpu);
    let (tensors, _) = load_safetensors(path, &device)?;
    for (name, var) in data.iter() {
        let t = tensors
            .get(name)
            .with_context(|| format!("{}: no tensor {name}", path.display()))?;
        if t.shape() != var.shape() {
            bail!(
                "{}: {name} has shape {:?}, the model {:?}",
                path.display(),
                t.shape(),
                var.shape()
            );
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// fsync a file.
fn sync_path(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("flushing {} to disk", path.display()))
}

/// fsync a directory's entries where the platform allows it (not on Windows): best effort, as
/// it only matters for power cuts, not for kills.
fn sync_dir(path: &Path) {
    let _ = std::fs::File::open(path).and_then(|f| f.sync_all());
}
