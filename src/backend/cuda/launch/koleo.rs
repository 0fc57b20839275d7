//! Launchers of `kernels/koleo.cu`: the KoLeo loss, forward and backward, and the row L2
//! normalisation of the projection heads.

use super::elementwise::ReduceOp;
use super::{check_len, dim, launch, per_row, warp_per_row};
use crate::backend::cuda::{bf16, CudaBackend, KernelFamily};
use crate::backend::{HeadOps, NormShape};
use crate::error::{Error, Result};
use cudarc::driver::CudaSlice;

/// Largest feature dim the backward kernel holds in registers (`KOLEO_MAX_D`).
pub const KOLEO_MAX_DIM: usize = 2048;

/// What the KoLeo forward saves for its backward.
#[derive(Debug)]
pub struct KoleoSaved {
    /// `[b, d]` normalised rows.
    pub xn: CudaSlice<f32>,
    /// `[b]` row norms before normalisation.
    pub norm: CudaSlice<f32>,
    /// `[b]` nearest-neighbour index of each row.
    pub nn: CudaSlice<i32>,
    /// `[b]` distance to it.
    pub dist: CudaSlice<f32>,
    /// `[b]` per-row `-log(d + 1e-8)`.
    pub row_loss: CudaSlice<f32>,
}

fn check(op: &'static str, saved: &KoleoSaved, b: usize, d: usize) -> Result<(i32, i32)> {
    if b < 2 {
        return Err(Error::shape(
            op,
            format!("KoLeo needs at least 2 rows, got {b}"),
        ));
    }
    if d == 0 || d > KOLEO_MAX_DIM {
        return Err(Error::Unsupported(format!(
            "{op}: feature dim {d} (1..={KOLEO_MAX_DIM})"
        )));
    }
    check_len(op, "xn", saved.xn.len(), b * d)?;
    for (name, len) in [
        ("norm", saved.norm.len()),
        ("nn", saved.nn.len()),
        ("dist", saved.dist.len()),
        ("row_loss", saved.row_loss.len()),
    ] {
        check_len(op, name, len, b)?;
    }
    Ok((dim(op, "rows", b)?, dim(op, "dim", d)?))
}

fn check_rows(op: &'static str, rows: usize, channels: usize, eps: f32) -> Result<(i32, i32)> {
    if channels == 0 {
        return Err(Error::shape(op, "zero channels"));
    }
    if eps.is_nan() || eps <= 0.0 {
        return Err(Error::Config(format!("{op}: eps must be > 0, got {eps}")));
    }
    Ok((dim(op, "rows", rows)?, dim(op, "channels", channels)?))
}

impl HeadOps for CudaBackend {
    type Koleo = KoleoSaved;

    /// Row L2 normalisation `z [R, C] = y / max(‖y‖, eps)` (also as bf16 for the next GEMM),
    /// saving `norm [R] = ‖y‖`.
    fn l2_normalize_forward(
        &mut self,
        z: &mut CudaSlice<f32>,
        z_half: &mut CudaSlice<bf16>,
        norm: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        eps: f32,
        shape: NormShape,
    ) -> Result<()> {
        let NormShape { rows, channels } = shape;
        const OP: &str = "cuda l2_normalize_forward";
        let (r, c) = check_rows(OP, rows, channels, eps)?;
        check_len(OP, "y", y.len(), rows * channels)?;
        check_len(OP, "z", z.len(), rows * channels)?;
        check_len(OP, "z_bf16", z_half.len(), rows * channels)?;
        check_len(OP, "norm", norm.len(), rows)?;
        launch!(
            self,
            KernelFamily::Koleo,
            "l2_normalize_forward",
            warp_per_row(OP, rows)?,
            [z, z_half, norm, y, &eps, &r, &c]
        );
        Ok(())
    }

    /// Backward of [`l2_normalize_forward`](Self::l2_normalize_forward): `dy [R, C]` (=, and as
    /// bf16) from `dz`, the saved `z` and `norm`.
    fn l2_normalize_backward(
        &mut self,
        dy: &mut CudaSlice<f32>,
        dy_half: &mut CudaSlice<bf16>,
        dz: &CudaSlice<f32>,
        z: &CudaSlice<f32>,
        norm: &CudaSlice<f32>,
        eps: f32,
        shape: NormShape,
    ) -> Result<()> {
        let NormShape { rows, channels } = shape;
        const OP: &str = "cuda l2_normalize_backward";
        let (r, c) = check_rows(OP, rows, channels, eps)?;
        for (name, len) in [
            ("dy", dy.len()),
            ("dy_bf16", dy_half.len()),
            ("dz", dz.len()),
            ("z", z.len()),
        ] {
            check_len(OP, name, len, rows * channels)?;
        }
        check_len(OP, "norm", norm.len(), rows)?;
        launch!(
            self,
            KernelFamily::Koleo,
            "l2_normalize_backward",
            warp_per_row(OP, rows)?,
            [dy, dy_half, dz, z, norm, &eps, &r, &c]
        );
        Ok(())
    }

    /// `W [K, Bn] = g · v / ‖v‖` per prototype row, saving `inv_norm [K]`.
    fn weight_norm_forward(
        &mut self,
        w: &mut CudaSlice<f32>,
        inv_norm: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        shape: NormShape,
    ) -> Result<()> {
        let NormShape { rows, channels } = shape;
        const OP: &str = "cuda weight_norm_forward";
        check_len(OP, "w", w.len(), rows * channels)?;
        check_len(OP, "v", v.len(), rows * channels)?;
        check_len(OP, "g", g.len(), rows)?;
        check_len(OP, "inv_norm", inv_norm.len(), rows)?;
        let (k, bn) = (
            dim(OP, "prototypes", rows)?,
            dim(OP, "bottleneck", channels)?,
        );
        launch!(
            self,
            KernelFamily::Optimizer,
            "weight_norm_forward",
            warp_per_row(OP, rows)?,
            [w, inv_norm, g, v, &k, &bn]
        );
        Ok(())
    }

    /// Weight-norm backward: `dg += ⟨dW, v̂⟩`, `dv += (g/‖v‖)(dW − v̂⟨v̂, dW⟩)` per row.
    fn weight_norm_backward(
        &mut self,
        dg: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
        dw: &CudaSlice<f32>,
        g: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        inv_norm: &CudaSlice<f32>,
        shape: NormShape,
    ) -> Result<()> {
        let NormShape { rows, channels } = shape;
        const OP: &str = "cuda weight_norm_backward";
        for (name, len) in [("dv", dv.len()), ("dw", dw.len()), ("v", v.len())] {
            check_len(OP, name, len, rows * channels)?;
        }
        for (name, len) in [
            ("dg", dg.len()),
            ("g", g.len()),
            ("inv_norm", inv_norm.len()),
        ] {
            check_len(OP, name, len, rows)?;
        }
        let (k, bn) = (
            dim(OP, "prototypes", rows)?,
            dim(OP, "bottleneck", channels)?,
        );
        launch!(
            self,
            KernelFamily::Optimizer,
            "weight_norm_backward",
            warp_per_row(OP, rows)?,
            [dg, dv, dw, g, v, inv_norm, &k, &bn]
        );
        Ok(())
    }

    /// Buffers for `b` rows of `d` features (allocated once, reused every step).
    fn koleo_state(&mut self, b: usize, d: usize) -> Result<KoleoSaved> {
        self.allocations += 5;
        Ok(KoleoSaved {
            xn: self.alloc_zeros(b * d)?,
            norm: self.alloc_zeros(b)?,
            nn: self.alloc_zeros(b)?,
            dist: self.alloc_zeros(b)?,
            row_loss: self.alloc_zeros(b)?,
        })
    }

    /// `loss [1] = KL(x)` for `x [b, d]`, filling `saved` for the backward.
    fn koleo_forward(
        &mut self,
        loss: &mut CudaSlice<f32>,
        state: &mut KoleoSaved,
        x: &CudaSlice<f32>,
        b: usize,
        d: usize,
    ) -> Result<()> {
        const OP: &str = "cuda koleo_forward";
        let (bi, di) = check(OP, state, b, d)?;
        check_len(OP, "x", x.len(), b * d)?;
        check_len(OP, "loss", loss.len(), 1)?;
        launch!(
            self,
            KernelFamily::Koleo,
            "koleo_normalize",
            warp_per_row(OP, b)?,
            [&mut state.xn, &mut state.norm, x, &bi, &di]
        );
        launch!(
            self,
            KernelFamily::Koleo,
            "koleo_nearest",
            per_row(OP, b)?,
            [
                &mut state.nn,
                &mut state.dist,
                &mut state.row_loss,
                &state.xn,
                &bi,
                &di
            ]
        );
        self.sum(loss, &state.row_loss, ReduceOp::Sum, 1.0 / b as f32)
    }

    /// `dx [b, d] = dloss · dKL/dx` (written), from the forward's `saved`.
    fn koleo_backward(
        &mut self,
        dx: &mut CudaSlice<f32>,
        state: &KoleoSaved,
        weight: f32,
        b: usize,
        d: usize,
    ) -> Result<()> {
        const OP: &str = "cuda koleo_backward";
        let (bi, di) = check(OP, state, b, d)?;
        check_len(OP, "dx", dx.len(), b * d)?;
        launch!(
            self,
            KernelFamily::Koleo,
            "koleo_backward",
            per_row(OP, b)?,
            [
                dx,
                &state.xn,
                &state.norm,
                &state.nn,
                &state.dist,
                &weight,
                &bi,
                &di
            ]
        );
        Ok(())
    }
}
