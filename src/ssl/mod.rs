//! The DINOv2 method, written once over the backend seam: teacher targets (centering or
//! Sinkhorn-Knopp), the DINO CLS loss, the iBOT masked-patch loss, KoLeo, the block masking of
//! the collate step, and the whole training step.
//!
//! Every loss is composable: logits in, loss and gradient w.r.t. the student logits out. The
//! training step (teacher, student, heads) composes them.

pub mod centering;
pub mod dino_loss;
pub mod ibot_loss;
pub mod koleo;
pub mod masking;
pub mod model;
pub mod step;

pub use centering::{Centering, TargetState};
pub use dino_loss::{dino_loss_forward_backward, DinoLossTerms, DinoPairs, DinoStudent};
pub use ibot_loss::{ibot_loss_forward_backward, IbotPairs};
pub use koleo::koleo_loss_forward_backward;
pub use masking::{collate_masks, collate_masks_for_step, MaskBatch, MaskingGenerator};
pub use model::{HeadConfig, SslModel};
pub use step::{
    LossConfig, SslStep, StepBatch, StepInputs, StepOutput, Targets, TeacherProbs, TeacherTargets,
};

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// Which stage of the method to train (`--method`): the seed's lesson is to validate stage by
/// stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// DINO: the CLS-token loss only.
    Dino,
    /// iBOT: the CLS loss plus the masked-patch loss.
    Ibot,
    /// DINOv2: CLS + masked-patch losses + KoLeo (the official recipe, the default).
    #[default]
    Dinov2,
}

impl Method {
    /// Whether the iBOT masked-patch loss is on (and masks are drawn).
    pub fn uses_ibot(self) -> bool {
        matches!(self, Method::Ibot | Method::Dinov2)
    }

    /// Whether the KoLeo regulariser is on.
    pub fn uses_koleo(self) -> bool {
        matches!(self, Method::Dinov2)
    }
}

impl FromStr for Method {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "dino" => Ok(Method::Dino),
            "ibot" => Ok(Method::Ibot),
            "dinov2" => Ok(Method::Dinov2),
            _ => Err(Error::Config(format!(
                "unknown method '{s}' (expected dino, ibot or dinov2)"
            ))),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Dino => "dino",
            Method::Ibot => "ibot",
            Method::Dinov2 => "dinov2",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_round_trips_and_stages_add_up() {
        for m in [Method::Dino, Method::Ibot, Method::Dinov2] {
            assert_eq!(m.to_string().parse::<Method>().unwrap(), m);
        }
        assert_eq!(Method::default(), Method::Dinov2);
        assert!(!Method::Dino.uses_ibot() && !Method::Dino.uses_koleo());
        assert!(Method::Ibot.uses_ibot() && !Method::Ibot.uses_koleo());
        assert!(Method::Dinov2.uses_ibot() && Method::Dinov2.uses_koleo());
        assert!("dinov3".parse::<Method>().is_err());
    }
}
