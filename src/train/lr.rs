//! Learning-rate schedules: a linear warmup, then constant, linear or cosine decay, with the
//! formulas of diffusers' `get_scheduler` (itself transformers' LambdaLR schedules), so a run
//! configured like a diffusers script gets the same learning rate at every step.
//!
//! `step` counts the optimizer updates already done: the first update uses `lr(0)`, which is 0
//! when there is a warmup (as in diffusers).
use std::f64::consts::PI;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduleKind {
    /// The base rate throughout; no warmup even if one is set (diffusers' "constant").
    Constant,
    ConstantWithWarmup,
    /// Warmup, then down in a straight line to 0 at `total_steps`.
    Linear,
    /// Warmup, then half a cosine down to `min_lr_ratio * base_lr` at `total_steps`.
    Cosine,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    pub kind: LrScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Where the cosine ends, as a fraction of `base_lr`; 0 is diffusers' "cosine",
    /// anything else transformers' `cosine_with_min_lr` (`min_lr_rate`).
    #[serde(default)]
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    /// The learning rate for the update that follows `step` updates.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: u64) -> f64 {
        let step = step as f64;
        let warmup = self.warmup_steps as f64;
        if self.kind == LrScheduleKind::Constant {
            return 1.0;
        }
        if step < warmup {
            return step / warmup.max(1.0);
        }
        let remaining = (self.total_steps as f64 - warmup).max(1.0);
        match self.kind {
            LrScheduleKind::Constant | LrScheduleKind::ConstantWithWarmup => 1.0,
            LrScheduleKind::Linear => ((self.total_steps as f64 - step) / remaining).max(0.0),
            LrScheduleKind::Cosine => {
                // Past total_steps diffusers' cosine would rise again; we stay at the minimum.
                let progress = ((step - warmup) / remaining).min(1.0);
                let cosine = 0.5 * (1.0 + (PI * progress).cos());
                cosine * (1.0 - self.min_lr_ratio) + self.min_lr_ratio
            }
        }
    }
}
