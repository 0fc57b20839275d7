//! Per-iteration schedules (spec 9.4): the official `CosineScheduler` and the five scheduled
//! values of a run (lr with the sqrt batch scaling, weight decay, teacher momentum, teacher
//! temperature, last-layer lr). Values are computed on the fly in f64, no arrays.

use crate::error::{Error, Result};

/// `CosineScheduler(base, final, total_iters, warmup_iters, start_warmup_value, freeze_iters)`:
/// `freeze_iters` zeros, then `linspace(start_warmup_value, base, warmup_iters)` with its
/// endpoint included, then `final + ½(base − final)(1 + cos(π·i/n))` for `i < n =
/// total − warmup − freeze`; from `total_iters` on, `final`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineScheduler {
    pub base: f64,
    pub final_value: f64,
    pub total_iters: u64,
    pub warmup_iters: u64,
    pub start_warmup_value: f64,
    pub freeze_iters: u64,
}

impl CosineScheduler {
    pub fn new(
        base: f64,
        final_value: f64,
        total_iters: u64,
        warmup_iters: u64,
        start_warmup_value: f64,
        freeze_iters: u64,
    ) -> Result<Self> {
        if warmup_iters + freeze_iters > total_iters {
            return Err(Error::Config(format!(
                "schedule: warm-up ({warmup_iters}) + freeze ({freeze_iters}) iterations exceed the total ({total_iters})"
            )));
        }
        Ok(CosineScheduler {
            base,
            final_value,
            total_iters,
            warmup_iters,
            start_warmup_value,
            freeze_iters,
        })
    }

    /// The value at iteration `it`.
    pub fn at(&self, it: u64) -> f64 {
        if it >= self.total_iters {
            return self.final_value;
        }
        if it < self.freeze_iters {
            return 0.0;
        }
        let j = it - self.freeze_iters;
        if j < self.warmup_iters {
            // numpy.linspace: start + j·step, the last point exactly `base`.
            if j + 1 == self.warmup_iters {
                return if self.warmup_iters == 1 {
                    self.start_warmup_value
                } else {
                    self.base
                };
            }
            let step = (self.base - self.start_warmup_value) / (self.warmup_iters - 1) as f64;
            return self.start_warmup_value + j as f64 * step;
        }
        let i = (j - self.warmup_iters) as f64;
        let n = (self.total_iters - self.warmup_iters - self.freeze_iters) as f64;
        self.final_value
            + 0.5 * (self.base - self.final_value) * (1.0 + (std::f64::consts::PI * i / n).cos())
    }
}

/// The schedule configuration (`optim`, `teacher`, `train` keys); `Default` is official.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScheduleConfig {
    pub epochs: u64,
    /// Iterations per "epoch" (`OFFICIAL_EPOCH_LENGTH`, 1250), independent of the dataset.
    pub epoch_length: u64,
    pub warmup_epochs: u64,
    pub freeze_last_layer_epochs: u64,
    pub warmup_teacher_temp_epochs: u64,
    pub batch_size_per_gpu: u64,
    pub world_size: u64,
    /// lr for a total batch of 1024 (`sqrt_wrt_1024` scaling).
    pub base_lr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    pub momentum_teacher: f64,
    pub final_momentum_teacher: f64,
    pub warmup_teacher_temp: f64,
    pub teacher_temp: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            epochs: 100,
            epoch_length: 1250,
            warmup_epochs: 10,
            freeze_last_layer_epochs: 1,
            warmup_teacher_temp_epochs: 30,
            batch_size_per_gpu: 64,
            world_size: 1,
            base_lr: 0.004,
            min_lr: 1e-6,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            momentum_teacher: 0.992,
            final_momentum_teacher: 1.0,
            warmup_teacher_temp: 0.04,
            teacher_temp: 0.07,
        }
    }
}

/// The values of one iteration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScheduledValues {
    pub lr: f64,
    pub wd: f64,
    pub momentum: f64,
    pub teacher_temp: f64,
    /// `lr`, except 0 during the first `freeze_last_layer_epochs · epoch_length` iterations.
    pub last_layer_lr: f64,
}

/// All schedules of a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedules {
    pub lr: CosineScheduler,
    pub wd: CosineScheduler,
    pub momentum: CosineScheduler,
    pub teacher_temp: CosineScheduler,
    pub freeze_last_layer_iters: u64,
    /// `base_lr · sqrt(batch_size_per_gpu · world_size / 1024)`.
    pub lr_peak: f64,
}

impl Schedules {
    pub fn new(c: &ScheduleConfig) -> Result<Self> {
        if c.epoch_length == 0 || c.epochs == 0 {
            return Err(Error::Config(
                "schedule: epochs and epoch length must be positive".into(),
            ));
        }
        let total = c.epochs * c.epoch_length;
        let lr_peak = c.base_lr * ((c.batch_size_per_gpu * c.world_size) as f64 / 1024.0).sqrt();
        let tw = c.warmup_teacher_temp_epochs * c.epoch_length;
        Ok(Schedules {
            lr: CosineScheduler::new(
                lr_peak,
                c.min_lr,
                total,
                c.warmup_epochs * c.epoch_length,
                0.0,
                0,
            )?,
            wd: CosineScheduler::new(c.weight_decay, c.weight_decay_end, total, 0, 0.0, 0)?,
            momentum: CosineScheduler::new(
                c.momentum_teacher,
                c.final_momentum_teacher,
                total,
                0,
                0.0,
                0,
            )?,
            teacher_temp: CosineScheduler::new(
                c.teacher_temp,
                c.teacher_temp,
                tw,
                tw,
                c.warmup_teacher_temp,
                0,
            )?,
            freeze_last_layer_iters: c.freeze_last_layer_epochs * c.epoch_length,
            lr_peak,
        })
    }

    /// Number of training iterations.
    pub fn total_iters(&self) -> u64 {
        self.lr.total_iters
    }

    /// The values at iteration `it`.
    pub fn at(&self, it: u64) -> ScheduledValues {
        let lr = self.lr.at(it);
        ScheduledValues {
            lr,
            wd: self.wd.at(it),
            momentum: self.momentum.at(it),
            teacher_temp: self.teacher_temp.at(it),
            last_layer_lr: if it < self.freeze_last_layer_iters && it < self.lr.total_iters {
                0.0
            } else {
                lr
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_includes_its_endpoint_and_cosine_restarts_at_base() {
        let s = CosineScheduler::new(1.0, 0.0, 10, 3, 0.0, 0).unwrap();
        assert_eq!([s.at(0), s.at(1), s.at(2), s.at(3)], [0.0, 0.5, 1.0, 1.0]);
        assert!(s.at(9) > 0.0);
        assert_eq!(s.at(10), 0.0);
        let f = CosineScheduler::new(1.0, 0.5, 6, 2, 0.0, 2).unwrap();
        assert_eq!(
            [f.at(0), f.at(1), f.at(2), f.at(3), f.at(4)],
            [0.0, 0.0, 0.0, 1.0, 1.0]
        );
        assert!(CosineScheduler::new(1.0, 0.0, 3, 2, 0.0, 2).is_err());
    }

    #[test]
    fn official_defaults() {
        let s = Schedules::new(&ScheduleConfig::default()).unwrap();
        assert_eq!(s.total_iters(), 125_000);
        assert!((s.lr_peak - 0.004 * 0.25).abs() < 1e-15);
        assert_eq!(s.at(1249).last_layer_lr, 0.0);
        assert_eq!(s.at(1250).last_layer_lr, s.at(1250).lr);
        assert!((s.at(1250).lr - s.lr_peak * 1250.0 / 12499.0).abs() < 1e-12);
        assert_eq!(s.at(37_500).teacher_temp, 0.07);
        assert_eq!(s.at(0).teacher_temp, 0.04);
    }
}
