//! Teacher targets on the GPU, mirroring [`crate::ssl::Centering`]: softmax centering with the
//! lagged center (the targets use the center built from earlier steps, then the center moves)
//! or Sinkhorn-Knopp over all rows of the batch jointly.

use super::buffers::{alloc_counted, upload_into, Grow};
use crate::backend::cuda::CudaBackend;
use crate::error::{Error, Result};
use crate::ssl::step::TeacherTargets;
use crate::ssl::Centering;
use cudarc::driver::CudaSlice;

/// One loss's teacher-target state on the device.
#[derive(Debug)]
pub enum GpuCentering {
    Softmax {
        /// `[K]` the center the next targets use.
        center: CudaSlice<f32>,
        /// `[K]` where the moved center is written before the two swap.
        next: CudaSlice<f32>,
        momentum: f32,
    },
    SinkhornKnopp {
        n_iters: usize,
        /// `[K]`, `[R]` Sinkhorn scaling vectors (scratch).
        a: Grow<f32>,
        b: Grow<f32>,
    },
}

impl GpuCentering {
    /// The device copy of a host [`Centering`].
    pub fn upload(gpu: &CudaBackend, host: &Centering) -> Result<Self> {
        match host {
            Centering::Softmax { center, momentum } => {
                if center.is_empty() {
                    return Err(Error::shape("GpuCentering", "an empty center"));
                }
                let mut c = alloc_counted(gpu, center.len())?;
                upload_into(gpu, &mut c, center)?;
                Ok(GpuCentering::Softmax {
                    center: c,
                    next: alloc_counted(gpu, center.len())?,
                    momentum: *momentum,
                })
            }
            Centering::SinkhornKnopp { n_iters } => Ok(GpuCentering::SinkhornKnopp {
                n_iters: *n_iters,
                a: Grow::default(),
                b: Grow::default(),
            }),
        }
    }

    /// Writes the device state back into `host` (same mode; the center is downloaded).
    pub fn download_into(&self, gpu: &CudaBackend, host: &mut Centering) -> Result<()> {
        match (self, host) {
            (GpuCentering::Softmax { center, .. }, Centering::Softmax { center: h, .. }) => {
                *h = gpu.download(center)?;
                Ok(())
            }
            (GpuCentering::SinkhornKnopp { .. }, Centering::SinkhornKnopp { .. }) => Ok(()),
            _ => Err(Error::Config(
                "the device and host teacher targets use different centering modes".into(),
            )),
        }
    }

    /// Replaces the device state with `host`'s (resume); the mode must match.
    pub fn upload_from(&mut self, gpu: &CudaBackend, host: &Centering) -> Result<()> {
        match (self, host) {
            (
                GpuCentering::Softmax {
                    center, momentum, ..
                },
                Centering::Softmax {
                    center: h,
                    momentum: m,
                },
            ) => {
                if h.len() != center.len() {
                    return Err(Error::shape(
                        "GpuCentering::upload_from",
                        format!("a center of {} for {} prototypes", h.len(), center.len()),
                    ));
                }
                *momentum = *m;
                upload_into(gpu, center, h)
            }
            (
                GpuCentering::SinkhornKnopp { n_iters, .. },
                Centering::SinkhornKnopp { n_iters: n },
            ) => {
                *n_iters = *n;
                Ok(())
            }
            _ => Err(Error::Config(
                "the device and host teacher targets use different centering modes".into(),
            )),
        }
    }

    /// Targets `probs [R, K]` of `logits [R, K]` at `teacher_temp`, then (softmax) the center
    /// update from this batch. No rows: nothing changes (as on the CPU).
    pub fn teacher_probs(
        &mut self,
        gpu: &mut CudaBackend,
        probs: &mut CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        rows: usize,
        k: usize,
        teacher_temp: f32,
    ) -> Result<()> {
        const OP: &str = "gpu teacher targets";
        if !(teacher_temp.is_finite() && teacher_temp > 0.0) {
            return Err(Error::Config(format!(
                "{OP}: teacher temperature must be a positive number, got {teacher_temp}"
            )));
        }
        if rows == 0 || k == 0 {
            return Ok(());
        }
        match self {
            GpuCentering::Softmax {
                center,
                next,
                momentum,
            } => {
                if center.len() != k {
                    return Err(Error::shape(
                        OP,
                        format!("center has {} prototypes, logits have {k}", center.len()),
                    ));
                }
                gpu.teacher_softmax(probs, logits, Some(center), teacher_temp, rows, k)?;
                gpu.center_ema(next, logits, center, f64::from(*momentum), rows, k)?;
                std::mem::swap(center, next);
                Ok(())
            }
            GpuCentering::SinkhornKnopp { n_iters, a, b } => {
                if *n_iters == 0 {
                    return Err(Error::Config(format!(
                        "{OP}: Sinkhorn-Knopp needs at least one iteration"
                    )));
                }
                a.resize(gpu, k)?;
                b.resize(gpu, rows)?;
                let mut a = a.get_mut(gpu)?;
                let mut b = b.get_mut(gpu)?;
                gpu.sinkhorn_knopp(
                    probs,
                    &mut a,
                    &mut b,
                    logits,
                    rows,
                    k,
                    teacher_temp,
                    rows,
                    *n_iters,
                )
            }
        }
    }
}

/// The device copy of [`TeacherTargets`]: the DINO and the iBOT states.
#[derive(Debug)]
pub struct GpuTargets {
    pub dino: GpuCentering,
    pub ibot: GpuCentering,
}

impl GpuTargets {
    pub fn upload(gpu: &CudaBackend, host: &TeacherTargets) -> Result<Self> {
        Ok(GpuTargets {
            dino: GpuCentering::upload(gpu, &host.dino)?,
            ibot: GpuCentering::upload(gpu, &host.ibot)?,
        })
    }

    pub fn download_into(&self, gpu: &CudaBackend, host: &mut TeacherTargets) -> Result<()> {
        self.dino.download_into(gpu, &mut host.dino)?;
        self.ibot.download_into(gpu, &mut host.ibot)
    }

    pub fn upload_from(&mut self, gpu: &CudaBackend, host: &TeacherTargets) -> Result<()> {
        self.dino.upload_from(gpu, &host.dino)?;
        self.ibot.upload_from(gpu, &host.ibot)
    }
}
