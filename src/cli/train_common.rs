//! What `train` and `train-vae` share: the optimisation settings of a config file, and a
//! `Run` that owns the boring parts of a training loop (progress bar, metrics log,
//! checkpoints, resume, NaN guard), so each loop file shows only its objective.
use crate::io::captions::{read_captions, CaptionedImage};
use crate::train::checkpoint::{Checkpoint, CheckpointParts, Checkpoints, RngState, TrainState};
use crate::train::data::DataPosition;
use crate::train::ema::{Ema, EmaConfig};
use crate::train::lr::{LrSchedule, LrScheduleKind};
use crate::train::metrics::{
    check_finite, read_metrics, unix_time, MetricsLog, MetricsRecord, SmoothedLoss,
};
use crate::train::optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, ParamGrads};
use anyhow::{bail, Context, Result};
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The options `train` and `train-vae` share.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// A training config (TOML, see configs/); the options below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Override any config option: KEY=VALUE with a dotted key, e.g.
    /// `--set train.warmup_steps=200 --set model.unet.block_out_channels=[32,64]` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,

    /// Where the trained model is written, with its checkpoints, metrics.jsonl and validation
    /// images (samples/).
    #[arg(long, short = 'o')]
    pub output: PathBuf,

    /// Continue the run whose checkpoints are in --output.
    #[arg(long)]
    pub resume: bool,

    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,

    /// Stop at the first bad line or unreadable image instead of skipping it.
    #[arg(long)]
    pub strict: bool,

    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl RunArgs {
    /// The command line's values win over the config file's.
    pub fn apply(&self, t: &mut OptimOptions) {
        t.steps = self.steps.unwrap_or(t.steps);
        t.batch_size = self.batch_size.unwrap_or(t.batch_size);
        t.learning_rate = self.learning_rate.unwrap_or(t.learning_rate);
        t.seed = self.seed.unwrap_or(t.seed);
    }
}

/// `[train]` in a training config: how to optimise.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OptimOptions {
    pub steps: u64,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub lr_schedule: LrScheduleKind,
    pub warmup_steps: u64,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub grad_clip: f64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// EMA decay of the weights (0: no EMA); the EMA weights are the output.
    pub ema_decay: f64,
    pub seed: u64,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    /// Validation images every this many steps (0: never).
    pub validate_every: u64,
    pub log_every: u64,
}

impl Default for OptimOptions {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 16,
            learning_rate: 1e-4,
            lr_schedule: LrScheduleKind::ConstantWithWarmup,
            warmup_steps: 100,
            min_lr_ratio: 0.0,
            weight_decay: 1e-2,
            grad_clip: 1.0,
            grad_accum: 1,
            ema_decay: 0.999,
            seed: 0,
            checkpoint_every: 500,
            keep_checkpoints: 2,
            validate_every: 500,
            log_every: 10,
        }
    }
}

impl OptimOptions {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.batch_size == 0 || self.grad_accum == 0 {
            bail!("steps, batch_size and grad_accum must be at least 1");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            bail!(
                "learning_rate {} must be a positive number",
                self.learning_rate
            );
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            bail!("ema_decay {} must be in [0, 1)", self.ema_decay);
        }
        Ok(())
    }
}

/// Reads a TOML config into `T` (an empty config when `path` is None), after applying
/// `--set KEY=VALUE` overrides: KEY is a dotted path such as `train.warmup_steps` or
/// `model.unet.block_out_channels`, VALUE a TOML value (`100`, `1e-4`, `"cosine"`, `[32, 64]`;
/// a bare word is taken as a string). This makes every config option settable on the command line.
pub fn read_toml<T: serde::de::DeserializeOwned>(
    path: Option<&Path>,
    overrides: &[String],
) -> Result<T> {
    let (mut table, name) = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config {}", path.display()))?;
            let table: toml::Table = toml::from_str(&text)
                .with_context(|| format!("{} is not valid TOML", path.display()))?;
            (table, path.display().to_string())
        }
        None => (toml::Table::new(), "the command line".to_string()),
    };
    for entry in overrides {
        set_override(&mut table, entry)?;
    }
    toml::Value::Table(table)
        .try_into()
        .with_context(|| format!("{name} is not a valid training config"))
}

fn set_override(table: &mut toml::Table, entry: &str) -> Result<()> {
    let (key, raw) = entry.split_once('=').with_context(|| {
        format!("--set {entry:?}: expected KEY=VALUE, e.g. train.warmup_steps=100")
    })?;
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap(),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut node = table;
    for part in &parts[..parts.len() - 1] {
        node = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("--set {key}: {part} is not a table"))?;
    }
    node.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// The dataset's usable items; problems are reported (or fatal with `strict`).
pub fn load_dataset(source: &Path, strict: bool) -> Result<Vec<CaptionedImage>> {
    let set = read_captions(source)?;
    for p in set.problems.iter().take(20) {
        eprintln!("warning: {p}");
    }
    if set.problems.len() > 20 {
        eprintln!("warning: ... and {} more problems", set.problems.len() - 20);
    }
    if strict && !set.problems.is_empty() {
        bail!(
            "{} problems in the dataset (strict mode): the first is {}",
            set.problems.len(),
            set.problems[0]
        );
    }
    if set.items.is_empty() {
        bail!(
            "the dataset {} has no usable images{}",
            source.display(),
            if set.problems.is_empty() {
                String::new()
            } else {
                format!(" ({} problems above)", set.problems.len())
            }
        );
    }
    eprintln!(
        "dataset: {} images ({} skipped)",
        set.items.len(),
        set.problems.len()
    );
    Ok(set.items)
}

/// Refuses to start a fresh run (no `resume`) in a directory holding another run's checkpoints.
/// Call it before writing anything there (the from-scratch tokenizer, say), so that a forgotten
/// --resume leaves the old run as it was.
pub fn check_fresh_output(output: &Path, resume: bool) -> Result<()> {
    if !resume
        && !Checkpoints::new(&output.join("checkpoints"), 1)
            .list()?
            .is_empty()
    {
        bail!(
            "{} already holds checkpoints of a run: pass --resume to continue it, or choose another --output",
            output.display()
        );
    }
    Ok(())
}

/// Loads the newest checkpoint that opens and loads into the run's weights, optimizer and EMA,
/// warning about each newer one passed over (e.g. damaged by a full disk or a bad copy).
fn resume_from(
    checkpoints: &Checkpoints,
    weights: &[(String, VarMap)],
    optimizer: &mut AdamW,
    mut ema: Option<&mut Ema>,
) -> Result<Checkpoint> {
    let found = checkpoints.list()?;
    if found.is_empty() {
        bail!(
            "--resume: no checkpoint in {} to continue from (run without --resume to start)",
            checkpoints.root().display()
        );
    }
    for (_, dir) in found.iter().rev() {
        // A failed load leaves partly set weights; the next checkpoint's load sets them all.
        let loaded = Checkpoint::open(dir).and_then(|ckpt| {
            for (name, vm) in weights {
                ckpt.load_weights(name, vm)?;
            }
            ckpt.load_optimizer(optimizer)?;
            if let Some(ema) = ema.as_deref_mut() {
                ckpt.load_ema(ema)?;
            }
            Ok(ckpt)
        });
        match loaded {
            Ok(ckpt) => return Ok(ckpt),
            Err(e) => eprintln!("warning: skipping a damaged checkpoint: {e:#}"),
        }
    }
    bail!(
        "--resume: none of the {} checkpoints in {} could be loaded (see the warnings above)",
        found.len(),
        checkpoints.root().display()
    )
}

/// The settings that differ between the config a run was saved with and the current one, as
/// "path: old -> new". `train.steps` is left out: a resumed run commonly extends the step count.
pub fn config_changes(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    fn walk(path: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
        if path == "train.steps" || old == new {
            return;
        }
        if let (Some(a), Some(b)) = (old.as_object(), new.as_object()) {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            let null = serde_json::Value::Null;
            for k in keys {
                let sub = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                walk(
                    &sub,
                    a.get(k).unwrap_or(&null),
                    b.get(k).unwrap_or(&null),
                    out,
                );
            }
        } else {
            out.push(format!(
                "{}: {old} -> {new}",
                if path.is_empty() { "config" } else { path }
            ));
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

/// One training run: optimizer, EMA, RNG, data position and everything around the loop.
pub struct Run {
    pub opts: OptimOptions,
    pub optimizer: AdamW,
    pub ema: Option<Ema>,
    pub rng: ChaCha8Rng,
    pub data: DataPosition,
    pub step: u64,
    schedule: LrSchedule,
    checkpoints: Checkpoints,
    /// (checkpoint file name, weights) of every model trained.
    weights: Vec<(String, VarMap)>,
    config: serde_json::Value,
    metrics: MetricsLog,
    smoothed: SmoothedLoss,
    accumulator: GradAccumulator,
    bar: ProgressBar,
    last_log: (Instant, u64),
    /// The newest checkpoint written or resumed from, named when a NaN stops the run.
    last_checkpoint: Option<PathBuf>,
}

/// Weight of the past in the smoothed loss of the progress bar and metrics (about 50 steps).
const SMOOTHING: f64 = 0.98;

impl Run {
    /// Sets up a run writing into `output`; with `resume`, continues from its latest checkpoint.
    /// `weights` are (name, varmap, parameter prefix) of every trained model.
    pub fn start(
        output: &Path,
        opts: OptimOptions,
        weights: Vec<(String, VarMap)>,
        config: serde_json::Value,
        resume: bool,
    ) -> Result<Self> {
        opts.validate()?;
        let vars = weights
            .iter()
            .flat_map(|(name, vm)| crate::train::optim::named_vars(vm, &format!("{name}.")))
            .collect::<Vec<_>>();
        let n_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
        eprintln!(
            "training {} tensors, {:.2} M parameters",
            vars.len(),
            n_params as f64 / 1e6
        );
        let adam = AdamWConfig {
            weight_decay: opts.weight_decay,
            ..Default::default()
        };
        let mut optimizer = AdamW::new(vars.clone(), adam)?;
        let mut ema = if opts.ema_decay > 0.0 {
            Some(Ema::new(
                &vars,
                EmaConfig {
                    max_decay: opts.ema_decay,
                    ..Default::default()
                },
            )?)
        } else {
            None
        };
        let checkpoints = Checkpoints::new(&output.join("checkpoints"), opts.keep_checkpoints);
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let mut data = DataPosition::default();
        let mut step = 0;
        let mut last_checkpoint = None;
        if resume {
            let ckpt = resume_from(&checkpoints, &weights, &mut optimizer, ema.as_mut())?;
            let state = &ckpt.state;
            let changes = config_changes(&state.config, &config);
            if !changes.is_empty() {
                eprintln!(
                    "warning: the config differs from the one the run started with ({}); continuing with the new one",
                    changes.join(", ")
                );
            }
            rng = state.rng.restore()?;
            data = state.data;
            step = state.step;
            eprintln!("resumed from {} at step {step}", ckpt.dir.display());
            last_checkpoint = Some(ckpt.dir);
        } else {
            check_fresh_output(output, resume)?;
        }
        let schedule = LrSchedule {
            kind: opts.lr_schedule,
            base_lr: opts.learning_rate,
            warmup_steps: opts.warmup_steps,
            total_steps: opts.steps,
            min_lr_ratio: opts.min_lr_ratio,
        };
        // A fresh run starts a fresh log (step 0 keeps nothing); a resumed one drops what was
        // logged after its checkpoint and carries on the smoothed loss from its last record.
        let metrics_path = output.join("metrics.jsonl");
        let metrics = MetricsLog::open(&metrics_path, Some(step))?;
        let smoothed = match read_metrics(&metrics_path)
            .ok()
            .and_then(|r| r.last().cloned())
        {
            Some(last) if resume => SmoothedLoss::resume(SMOOTHING, last.smoothed_loss, step),
            _ => SmoothedLoss::new(SMOOTHING),
        };
        let bar = ProgressBar::new(opts.steps);
        bar.set_style(
            ProgressStyle::with_template(
                "[{elapsed_precise}] {bar:30} step {pos}/{len} {msg} ETA {eta}",
            )
            .unwrap(),
        );
        bar.set_position(step);
        Ok(Self {
            opts,
            optimizer,
            ema,
            rng,
            data,
            step,
            schedule,
            checkpoints,
            weights,
            config,
            metrics,
            smoothed,
            accumulator: GradAccumulator::new(),
            bar,
            last_log: (Instant::now(), step),
            last_checkpoint,
        })
    }

    pub fn done(&self) -> bool {
        self.step >= self.opts.steps
    }

    pub fn println(&self, msg: impl AsRef<str>) {
        self.bar.suspend(|| eprintln!("{}", msg.as_ref()));
    }

    /// Takes the gradients of one micro-batch; after `grad_accum` of them, clips, updates the
    /// weights and the EMA, logs and checkpoints. Returns true when an optimizer step was made.
    pub fn micro_step(
        &mut self,
        loss: f64,
        grads: ParamGrads,
        data_after: DataPosition,
    ) -> Result<bool> {
        self.guard(check_finite(self.step + 1, "loss", loss))?;
        if self.step == 0 && self.accumulator.count() == 0 {
            let missing = self.optimizer.without_grad(&grads);
            if !missing.is_empty() {
                bail!("{} parameters get no gradient (first: {}): an op without backward is on their path", missing.len(), missing[0]);
            }
        }
        self.accumulator.add(grads)?;
        if self.accumulator.count() < self.opts.grad_accum {
            return Ok(false);
        }
        let mut grads = self.accumulator.finish()?;
        let grad_norm = if self.opts.grad_clip > 0.0 {
            clip_grad_norm(&mut grads, self.opts.grad_clip)?
        } else {
            crate::train::optim::grad_norm(&grads)?
        };
        self.guard(check_finite(self.step + 1, "gradient norm", grad_norm))?;
        let lr = self.schedule.lr(self.step);
        self.optimizer.step(&grads, lr)?;
        if let Some(ema) = self.ema.as_mut() {
            let vars: Vec<_> = self
                .weights
                .iter()
                .flat_map(|(name, vm)| crate::train::optim::named_vars(vm, &format!("{name}.")))
                .collect();
            ema.update(&vars)?;
        }
        self.step += 1;
        self.data = data_after;
        let smoothed = self.smoothed.update(loss);
        self.bar.set_position(self.step);
        let (t0, s0) = self.last_log;
        let elapsed = t0.elapsed().as_secs_f64();
        let samples_per_sec =
            ((self.step - s0) as usize * self.opts.batch_size * self.opts.grad_accum) as f64
                / elapsed.max(1e-9);
        self.bar
            .set_message(format!("loss {smoothed:.4} ({samples_per_sec:.1} img/s)"));
        if self.step.is_multiple_of(self.opts.log_every.max(1)) || self.done() {
            self.metrics.write(&MetricsRecord {
                step: self.step,
                loss,
                smoothed_loss: smoothed,
                lr,
                grad_norm: Some(grad_norm),
                samples_per_sec,
                time: unix_time(),
            })?;
            self.last_log = (Instant::now(), self.step);
        }
        if self.step.is_multiple_of(self.opts.checkpoint_every.max(1)) || self.done() {
            self.checkpoint()?;
        }
        Ok(true)
    }

    /// Adds where the run can be continued from to a NaN/Inf stop.
    fn guard(&self, finite: Result<()>) -> Result<()> {
        finite.map_err(|e| match &self.last_checkpoint {
            Some(dir) => anyhow::anyhow!(
                "{e:#}; the last good checkpoint, {}, is kept (continue from it with --resume)",
                dir.display()
            ),
            None => anyhow::anyhow!("{e:#}; no checkpoint had been written yet"),
        })
    }

    pub fn checkpoint(&mut self) -> Result<PathBuf> {
        let state = TrainState {
            step: self.step,
            rng: RngState::capture(&self.rng),
            data: self.data,
            config: self.config.clone(),
        };
        let weights: Vec<(&str, &VarMap)> =
            self.weights.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let parts = CheckpointParts {
            weights,
            optimizer: &self.optimizer,
            ema: self.ema.as_ref(),
        };
        let dir = self.checkpoints.save(&state, &parts)?;
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    /// Whether validation images are due after the step just made.
    pub fn validation_due(&self) -> bool {
        self.opts.validate_every > 0
            && (self.step.is_multiple_of(self.opts.validate_every) || self.done())
    }

    /// The weights to publish for model `name`: the EMA ones when there is an EMA.
    pub fn output_weights(&self, name: &str) -> Result<VarMap> {
        let (_, vm) = self
            .weights
            .iter()
            .find(|(n, _)| n == name)
            .context("unknown model")?;
        let Some(ema) = &self.ema else {
            return Ok(vm.clone());
        };
        let out = VarMap::new();
        {
            let src = vm.data().lock().unwrap();
            let mut dst = out.data().lock().unwrap();
            for (k, v) in src.iter() {
                dst.insert(
                    k.clone(),
                    candle_core::Var::from_tensor(&v.as_tensor().copy()?)?,
                );
            }
        }
        let prefix = format!("{name}.");
        let weights = ema.weights(candle_core::DType::F32)?;
        let data = out.data().lock().unwrap();
        for (k, t) in weights {
            if let Some(var) = k.strip_prefix(&prefix).and_then(|k| data.get(k)) {
                var.set(&t.to_dtype(var.dtype())?)?;
            }
        }
        drop(data);
        Ok(out)
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_overrides_reach_any_option() {
        let table: toml::Table = toml::from_str("[train]\nsteps = 5\n").unwrap();
        let mut table = table;
        for entry in [
            "train.steps=7",
            "train.lr_schedule=cosine",
            "model.unet.block_out_channels=[8, 16]",
            "x=1e-4",
        ] {
            set_override(&mut table, entry).unwrap();
        }
        assert_eq!(table["train"]["steps"].as_integer(), Some(7));
        assert_eq!(table["train"]["lr_schedule"].as_str(), Some("cosine"));
        assert_eq!(
            table["model"]["unet"]["block_out_channels"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(table["x"].as_float(), Some(1e-4));
        assert!(set_override(&mut table, "no_equals_sign").is_err());
        assert!(set_override(&mut table, "x.y=1").is_err());
    }
    use serde_json::json;

    #[test]
    fn config_changes_name_each_setting_but_the_step_count() {
        let old = json!({"resolution": 64, "train": {"steps": 100, "learning_rate": 1e-4}, "model": {"unet": {"layers": [1, 2]}}});
        let longer = json!({"resolution": 64, "train": {"steps": 500, "learning_rate": 1e-4}, "model": {"unet": {"layers": [1, 2]}}});
        assert!(config_changes(&old, &longer).is_empty());
        let changed = json!({"resolution": 64, "train": {"steps": 500, "learning_rate": 2e-4, "seed": 3}, "model": {"unet": {"layers": [1, 3]}}});
        assert_eq!(
            config_changes(&old, &changed),
            vec![
                "model.unet.layers: [1,2] -> [1,3]".to_string(),
                "train.learning_rate: 0.0001 -> 0.0002".to_string(),
                "train.seed: null -> 3".to_string(),
            ]
        );
    }
}
