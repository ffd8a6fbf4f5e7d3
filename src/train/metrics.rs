//! What a run reports as it goes: a JSON Lines metrics log (one object per logged step, flushed
//! at once so `tail -f` and a kill both see every line), a smoothed loss for the progress bar,
//! and a guard that stops the run at the first NaN/Inf with the step that produced it.
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// One line of the metrics log.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricsRecord {
    pub step: u64,
    pub loss: f64,
    pub smoothed_loss: f64,
    pub lr: f64,
    /// The gradient norm before clipping (absent when not computed).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    pub samples_per_sec: f64,
    /// Wall-clock time of the record, seconds since the Unix epoch.
    pub time: f64,
}

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `path` for appending, creating it. With `resume_step`, lines logged after that step
    /// (by a run killed after its last checkpoint) are dropped first, so the resumed run does not
    /// log those steps twice.
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<Self> {
        if let Some(step) = resume_step {
            truncate_after(path, step)?;
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating directory {}", parent.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening metrics log {}", path.display()))?;
        let mut log = Self {
            path: path.to_path_buf(),
            file,
        };
        // A run killed mid-line left a torn last line: end it, so the next record starts afresh.
        if last_byte(path)?.is_some_and(|b| b != b'\n') {
            log.file.write_all(b"\n")?;
        }
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, record: &MetricsRecord) -> Result<()> {
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        // One write_all of a whole line on an O_APPEND file: a kill leaves whole lines.
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing metrics log {}", self.path.display()))
    }
}

/// Reads a metrics log back (lines that do not parse, e.g. a torn last line, are skipped).
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut records = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if let Ok(record) = serde_json::from_str(&line) {
            records.push(record);
        }
    }
    Ok(records)
}

fn last_byte(path: &Path) -> Result<Option<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if file.metadata()?.len() == 0 {
        return Ok(None);
    }
    let mut byte = [0u8];
    file.seek(SeekFrom::End(-1))?;
    file.read_exact(&mut byte)?;
    Ok(Some(byte[0]))
}

fn truncate_after(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let keep: String = text
        .lines()
        .filter(|line| serde_json::from_str::<MetricsRecord>(line).is_ok_and(|r| r.step <= step))
        .flat_map(|line| [line, "\n"])
        .collect();
    crate::io::write_atomic(path, keep.as_bytes())
}

/// An exponential moving average of the loss with bias correction (as TensorBoard's smoothing and
/// Adam's moments): the first values are not pulled towards 0.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SmoothedLoss {
    beta: f64,
    average: f64,
    count: u64,
}

impl SmoothedLoss {
    /// `beta` near 1 smooths more; 0.98 averages over roughly the last 50 values.
    pub fn new(beta: f64) -> Self {
        Self {
            beta,
            average: 0.0,
            count: 0,
        }
    }

    /// Carries on a smoothed loss that was `value` after `count` updates (a resumed run's last
    /// logged value): the bias correction is undone, so the next values continue the same curve.
    pub fn resume(beta: f64, value: f64, count: u64) -> Self {
        if count == 0 || !value.is_finite() {
            return Self::new(beta);
        }
        let correction = 1.0 - beta.powi(count.min(i32::MAX as u64) as i32);
        Self {
            beta,
            average: value * correction,
            count,
        }
    }

    /// Adds a value and returns the smoothed value.
    pub fn update(&mut self, value: f64) -> f64 {
        self.count += 1;
        self.average = self.beta * self.average + (1.0 - self.beta) * value;
        self.value()
    }

    /// The smoothed value (NaN before any update).
    pub fn value(&self) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        self.average / (1.0 - self.beta.powi(self.count.min(i32::MAX as u64) as i32))
    }
}

/// An error naming the step and the quantity when `value` is NaN or infinite: training on from a
/// non-finite loss or gradient only spreads NaNs through the weights (and the next checkpoint).
pub fn check_finite(step: u64, what: &str, value: f64) -> Result<()> {
    if !value.is_finite() {
        bail!(
            "{what} is {value} at step {step}: stopping before the weights are spoiled \
             (try a lower learning rate, gradient clipping, or f32)"
        );
    }
    Ok(())
}

/// Seconds since the Unix epoch, for [`MetricsRecord::time`].
pub fn unix_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
