//! The student (or teacher) model of the method: the backbone and its heads in one parameter
//! table under the official prefixes.

use crate::error::Result;
use crate::nn::params::ParamTable;
use crate::nn::{DinoHead, Vit, VitConfig};

/// Sizes of one projection head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadConfig {
    pub hidden_dim: usize,
    pub bottleneck_dim: usize,
    pub n_prototypes: usize,
}

/// The student (or teacher) model: backbone, DINO head and an optional separate iBOT head, all
/// parameters in one [`ParamTable`] under the official prefixes `backbone.`, `dino_head.` and
/// `ibot_head.`. Student and teacher share this layout; each has its own flat buffer.
#[derive(Clone, Debug)]
pub struct SslModel {
    pub table: ParamTable,
    pub backbone: Vit,
    pub dino_head: DinoHead,
    /// `Some` when `ibot.separate_head` is true; otherwise the iBOT loss uses the DINO head.
    pub ibot_head: Option<DinoHead>,
}

impl SslModel {
    /// Declares every parameter (official names and initialisation).
    pub fn new(vit: &VitConfig, dino: HeadConfig, ibot: Option<HeadConfig>) -> Result<Self> {
        vit.validate()?;
        let mut table = ParamTable::new();
        let backbone = Vit::new(vit, &mut table, "backbone.");
        let head = |h: HeadConfig, table: &mut ParamTable, prefix: &str| {
            DinoHead::new(
                vit.embed_dim,
                h.hidden_dim,
                h.bottleneck_dim,
                h.n_prototypes,
                table,
                prefix,
            )
        };
        let dino_head = head(dino, &mut table, "dino_head.");
        let ibot_head = ibot.map(|h| head(h, &mut table, "ibot_head."));
        Ok(SslModel {
            table,
            backbone,
            dino_head,
            ibot_head,
        })
    }

    /// The head the iBOT loss runs through.
    pub fn patch_head(&self) -> &DinoHead {
        self.ibot_head.as_ref().unwrap_or(&self.dino_head)
    }
}
