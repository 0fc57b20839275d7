//! Running the golden fixtures on a device (`dinotrain verify --device cuda`).
//!
//! On CUDA a case runs where the training step runs it: kernels and GEMMs on the GPU, with the
//! precision contract of DESIGN.md (bf16 GEMM operands and attention, f32 everything else).
//! Cases that are host computations in a CUDA run too (schedules, parameter groups, k-NN
//! evaluation, the position-embedding resampling) run the CPU code.
//!
//! Tolerances on CUDA are stated here, per case, before any GPU run: the fixture's own tolerance
//! where the case runs in f32 on the GPU, and a bf16 tolerance with its reason where bf16
//! operands enter (one bf16 rounding is a relative error of at most 2^-9 ≈ 2e-3 per operand;
//! ‖out − ref‖/‖ref‖ of a bf16 GEMM lands between 1e-3 and 1e-2, GPU.md).

use super::{compute, Fixture, Outputs};
use crate::backend::cuda::ResolvedDevice;
use crate::error::{Error, Result};

/// Where a case runs in a CUDA run and which tolerance applies there.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CudaCase {
    /// Host code in a CUDA run too: the CPU computation and the fixture's tolerance.
    Host,
    /// On the GPU in f32 (losses, Sinkhorn, KoLeo, optimizer, LayerNorm statistics and f32
    /// output): the fixture's tolerance.
    DeviceF32,
    /// On the GPU with bf16 operands: this tolerance, for this reason.
    DeviceBf16 { tol: f64, why: &'static str },
}

/// The rule for `case` on CUDA; `None` for an unknown case.
pub fn cuda_case(case: &str) -> Option<CudaCase> {
    use CudaCase::*;
    Some(match case {
        "schedules" | "param_groups" | "knn" | "pos_interp" => Host,
        "layernorm"
        | "dino_loss_centering"
        | "dino_loss_sinkhorn"
        | "ibot_loss"
        | "koleo"
        | "clip_grad"
        | "ema"
        | "adamw_freeze" => DeviceF32,
        "attention" => DeviceBf16 {
            tol: 1e-2,
            why: "bf16 q, k, v and output",
        },
        "block" => DeviceBf16 {
            tol: 1e-2,
            why: "bf16 GEMM operands and attention in one block",
        },
        "dino_head" => DeviceBf16 {
            tol: 1e-2,
            why: "bf16 GEMM operands in three linear layers",
        },
        "vit_forward" => DeviceBf16 {
            tol: 2e-2,
            why: "bf16 operands through every block, rounding compounds with depth",
        },
        "ssl_step" => DeviceBf16 {
            tol: 5e-2,
            why: "bf16 forward and backward of two models, losses and every gradient",
        },
        _ => return None,
    })
}

/// The tolerance `fx` is judged by on `device`.
pub fn tolerance_on(fx: &Fixture, device: &ResolvedDevice) -> f64 {
    match device {
        ResolvedDevice::Cpu(_) => fx.tol,
        ResolvedDevice::Cuda(_) => match cuda_case(&fx.case) {
            Some(CudaCase::DeviceBf16 { tol, .. }) => tol.max(fx.tol),
            _ => fx.tol,
        },
    }
}

/// Runs the project's code for `fx` on `device` and returns every `out.*` tensor.
pub fn compute_on(fx: &Fixture, device: &mut ResolvedDevice) -> Result<Outputs> {
    if cuda_case(&fx.case).is_none() {
        return Err(Error::Unsupported(format!(
            "{}: unknown golden case '{}'",
            fx.path.display(),
            fx.case
        )));
    }
    match device {
        ResolvedDevice::Cpu(cpu) => compute(fx, cpu),
        ResolvedDevice::Cuda(gpu) => compute(fx, &mut **gpu),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_golden_case_has_a_cuda_rule_and_bf16_rules_say_why() {
        for case in super::super::CASES {
            let rule = cuda_case(case).unwrap_or_else(|| panic!("no CUDA rule for {case}"));
            if let CudaCase::DeviceBf16 { tol, why } = rule {
                assert!(tol > 0.0 && tol <= 5e-2 && !why.is_empty(), "{case}");
            }
        }
        assert_eq!(cuda_case("nope"), None);
    }
}
