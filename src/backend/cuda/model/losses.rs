//! The DINO and iBOT losses on the GPU, mirroring [`crate::ssl::dino_loss`] and
//! [`crate::ssl::ibot_loss`], through the fused `softmax_cross_entropy` launcher with pairing
//! tables built on the host.
//!
//! DINO: each global student crop against the *other* crop's teacher, each local crop against
//! both teachers; every pair weighted `1 / (B · Dn)`, `Dn = 2 + max(2·nl, 1)`. iBOT: masked patch
//! i against teacher row i, weighted `masks_weight[i] / 2B`. The pair weights hold the
//! denominators and the gradient scale the loss weight, so the summed rows are the unweighted
//! terms the logs report (as on the CPU) and the gradients belong to the weighted total.

use super::buffers::{count_allocations, upload_into, Grow};
use crate::backend::cuda::{CrossEntropyPairs, CudaBackend};
use crate::error::{Error, Result};
use crate::ssl::dino_loss::dino_loss_denominator;
use cudarc::driver::CudaSlice;

/// The DINO pairing tables of one (B, nl) layout, rebuilt only when it changes.
#[derive(Debug, Default)]
pub struct DinoPairs {
    key: Option<(usize, usize)>,
    global: Option<CrossEntropyPairs>, // [2B, 1]
    local: Option<CrossEntropyPairs>,  // [nl·B, 2]
}

impl DinoPairs {
    fn ensure(&mut self, gpu: &CudaBackend, b: usize, nl: usize) -> Result<()> {
        if self.key == Some((b, nl)) {
            return Ok(());
        }
        let scale = (1.0 / (b as f64 * dino_loss_denominator(nl) as f64)) as f32;
        // Rows are crop-major: global row r (crop r / B) pairs with the other crop's row.
        let global: Vec<i32> = (0..2 * b).map(|r| ((r + b) % (2 * b)) as i32).collect();
        count_allocations(2);
        self.global = Some(CrossEntropyPairs::new(
            gpu,
            2 * b,
            1,
            &global,
            &vec![scale; 2 * b],
        )?);
        self.local = if nl > 0 {
            let teacher: Vec<i32> = (0..nl * b)
                .flat_map(|r| [(r % b) as i32, (b + r % b) as i32])
                .collect();
            count_allocations(2);
            Some(CrossEntropyPairs::new(
                gpu,
                nl * b,
                2,
                &teacher,
                &vec![scale; 2 * nl * b],
            )?)
        } else {
            None
        };
        self.key = Some((b, nl));
        Ok(())
    }
}

/// Forward and backward of the DINO loss. `terms [2]` receives the unweighted
/// (`dino_global_crops_loss`, `dino_local_crops_loss`) (the local term is left as it is without
/// local crops); `ds_global [2B, K]` and `ds_local [nl·B, K]` are overwritten with
/// `loss_weight · d loss / d logits`. Logits `s_global [2B, K]`, `s_local [nl·B, K]`, targets
/// `teacher_probs [2B, K]` in natural row order.
#[allow(clippy::too_many_arguments)]
pub fn dino_loss_forward_backward(
    gpu: &mut CudaBackend,
    pairs: &mut DinoPairs,
    terms: &mut CudaSlice<f32>,
    row_loss: &mut Grow<f32>,
    ds_global: &mut CudaSlice<f32>,
    ds_local: &mut CudaSlice<f32>,
    s_global: &CudaSlice<f32>,
    s_local: &CudaSlice<f32>,
    teacher_probs: &CudaSlice<f32>,
    b: usize,
    nl: usize,
    k: usize,
    student_temp: f32,
    loss_weight: f32,
) -> Result<()> {
    const OP: &str = "gpu dino loss";
    if b == 0 || k == 0 {
        return Err(Error::shape(
            OP,
            format!("needs images and prototypes, got B {b}, K {k}"),
        ));
    }
    if terms.len() != 2 {
        return Err(Error::shape(
            OP,
            format!("terms holds {}, expected 2", terms.len()),
        ));
    }
    pairs.ensure(gpu, b, nl)?;
    let [mut global_term, mut local_term] = gpu.sub_mut_disjoint(terms, [0..1, 1..2])?;
    let global = pairs
        .global
        .as_ref()
        .ok_or_else(|| Error::Cuda("DINO pairs missing".into()))?;
    row_loss.resize(gpu, 2 * b)?;
    gpu.softmax_cross_entropy(
        &mut global_term,
        &mut *row_loss.get_mut(gpu)?,
        ds_global,
        s_global,
        teacher_probs,
        global,
        student_temp,
        loss_weight,
        2 * b,
        k,
    )?;
    if nl > 0 {
        let local = pairs
            .local
            .as_ref()
            .ok_or_else(|| Error::Cuda("DINO local pairs missing".into()))?;
        row_loss.resize(gpu, nl * b)?;
        gpu.softmax_cross_entropy(
            &mut local_term,
            &mut *row_loss.get_mut(gpu)?,
            ds_local,
            s_local,
            teacher_probs,
            local,
            student_temp,
            loss_weight,
            2 * b,
            k,
        )?;
    }
    Ok(())
}

/// The iBOT pairing table of one step's masks, in a buffer that grows to the largest mask count
/// (the masks' official upper bound on the first step), so later steps only copy.
#[derive(Debug, Default)]
pub struct IbotPairs {
    pairs: Option<CrossEntropyPairs>,
    capacity: usize,
}

impl IbotPairs {
    /// Pairs masked patch i with teacher row i, weight `masks_weight[i] / n_global_crops`.
    pub fn set(
        &mut self,
        gpu: &CudaBackend,
        masks_weight: &[f32],
        n_global_crops: usize,
        capacity_hint: usize,
    ) -> Result<()> {
        if n_global_crops == 0 {
            return Err(Error::shape(
                "gpu ibot loss",
                "needs at least one global crop",
            ));
        }
        let m = masks_weight.len();
        let teacher: Vec<i32> = (0..m as i32).collect();
        let inv_crops = 1.0 / n_global_crops as f64;
        let weight: Vec<f32> = masks_weight
            .iter()
            .map(|&w| (w as f64 * inv_crops) as f32)
            .collect();
        match self.pairs.as_mut() {
            Some(p) if self.capacity >= m => {
                upload_into(gpu, &mut p.teacher, &teacher)?;
                upload_into(gpu, &mut p.weight, &weight)?;
                p.student_rows = m;
            }
            _ => {
                let capacity = m.max(capacity_hint).max(1);
                let mut t = vec![-1i32; capacity];
                t[..m].copy_from_slice(&teacher);
                let mut w = vec![0f32; capacity];
                w[..m].copy_from_slice(&weight);
                count_allocations(2);
                let mut p = CrossEntropyPairs::new(gpu, capacity, 1, &t, &w)?;
                p.student_rows = m;
                self.pairs = Some(p);
                self.capacity = capacity;
            }
        }
        Ok(())
    }

    /// Rows of the current table.
    pub fn rows(&self) -> usize {
        self.pairs.as_ref().map_or(0, |p| p.student_rows)
    }
}

/// Forward and backward of the iBOT loss over the `M` rows of the table [`IbotPairs::set`] built:
/// `loss [1]` = the unweighted loss, `ds [M, K]` (=) `loss_weight · d loss / d s`. `s [M, K]`
/// student logits of the masked patches, `teacher_probs [M, K]`.
#[allow(clippy::too_many_arguments)]
pub fn ibot_loss_forward_backward(
    gpu: &mut CudaBackend,
    pairs: &IbotPairs,
    loss: &mut CudaSlice<f32>,
    row_loss: &mut Grow<f32>,
    ds: &mut CudaSlice<f32>,
    s: &CudaSlice<f32>,
    teacher_probs: &CudaSlice<f32>,
    k: usize,
    student_temp: f32,
    loss_weight: f32,
) -> Result<()> {
    let m = pairs.rows();
    let table = pairs
        .pairs
        .as_ref()
        .ok_or_else(|| Error::Cuda("iBOT pairs missing: IbotPairs::set first".into()))?;
    if m == 0 {
        return Ok(());
    }
    row_loss.resize(gpu, m)?;
    gpu.softmax_cross_entropy(
        loss,
        &mut *row_loss.get_mut(gpu)?,
        ds,
        s,
        teacher_probs,
        table,
        student_temp,
        loss_weight,
        m,
        k,
    )
}
