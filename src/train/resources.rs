//! What a run asks of the machine, checked against what the machine has before anything is
//! allocated: a mistyped `--batch-size` or worker count is a clear error, not an abort on a
//! failed allocation or ten thousand threads.

use super::trainer::TrainPlan;
use crate::error::{Error, Result};

/// Loader worker threads allowed per CPU core (decoding waits on I/O, so a few per core help;
/// far more only cost memory and scheduling).
pub const MAX_WORKERS_PER_CORE: usize = 8;

/// Bytes of host memory this machine has (`MemTotal`), where the OS says.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The CPU cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Bytes of the crops of one batch (`f32`: two global and `n_local` local crops per image).
pub fn batch_crop_bytes(plan: &TrainPlan) -> Option<u64> {
    let g = (plan.global_crop_size as u64).checked_pow(2)?;
    let l = (plan.local_crop_size as u64).checked_pow(2)?;
    let per_image = 3 * (2 * g + plan.n_local_crops as u64 * l);
    per_image
        .checked_mul(plan.batch_size as u64)?
        .checked_mul(4)
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Refuses a run whose batch cannot fit in this machine's memory (the loader keeps a few
/// batches of crops in flight; the step needs several times one batch more), or whose loader
/// would start more threads than the machine can use.
pub fn check(plan: &TrainPlan, workers: usize) -> Result<()> {
    let cores = cores();
    if workers > MAX_WORKERS_PER_CORE * cores {
        return Err(Error::Config(format!(
            "dinotrain.workers = {workers}: this machine has {cores} cores; use at most {} \
             loader threads (0 = one per core)",
            MAX_WORKERS_PER_CORE * cores
        )));
    }
    // Crops in the loader's queue, the batch in the step and the one being filled: at least
    // four batches of crops must fit, activations come on top.
    const BATCHES_HELD: u64 = 4;
    let need = batch_crop_bytes(plan).and_then(|b| b.checked_mul(BATCHES_HELD));
    if let Some(have) = host_memory_bytes() {
        if need.is_none_or(|n| n > have) {
            let shown = need.map_or_else(
                || "more than 2^64 bytes".into(),
                |n| format!("{:.1} GiB", gib(n)),
            );
            return Err(Error::Config(format!(
                "batch size {}: the crops alone need {shown} of memory and this machine has \
                 {:.1} GiB; lower --batch-size",
                plan.batch_size,
                gib(have)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_is_read() {
        assert!(cores() >= 1);
        if cfg!(target_os = "linux") {
            assert!(host_memory_bytes().unwrap() > 1 << 20);
        }
    }
}
