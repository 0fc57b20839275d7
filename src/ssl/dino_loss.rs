//! The DINO CLS-token loss with the official crop pairing and denominators, over the backend's
//! paired cross-entropy.
//!
//! `B` images, `nl` local crops, `K` prototypes. Global rows are crop-major (`[0, B)` crop A,
//! `[B, 2B)` crop B), local rows too. Each global student crop is paired only with the teacher
//! of the *other* global crop; every local crop with both teachers. Every pair contributes the
//! mean over images of its cross-entropy, and the pair sums are divided by
//! `Dn = 2 + max(2·nl, 1)` (so with no local crop the global term is divided by 3: official).
//! The pair weights hold the denominators and the gradient scale the loss weight, so the summed
//! rows are the unweighted terms the logs report and the gradients belong to the weighted total.

use crate::backend::{workspace, Backend, Storage};
use crate::error::{Error, Result};

/// The official student temperature.
pub const STUDENT_TEMP: f32 = 0.1;

/// The DINO loss terms of one step (unweighted, as the official logs report them) and the
/// weighted total that is back-propagated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DinoLossTerms {
    pub local: f32,
    pub global: f32,
    pub total: f32,
}

/// `Dn = 2 + max(2·nl, 1)`: the number of (student, teacher) pair terms the official loss
/// divides by (the `max` is the official no-local-crop quirk).
pub fn dino_loss_denominator(n_local: usize) -> usize {
    2 + (2 * n_local).max(1)
}

workspace! {
    /// The pairing tables of one (B, nl) layout, rebuilt only when it changes.
    pub struct DinoPairs<B: Backend> {
        key: Option<(usize, usize)>,
        global: Option<B::Pairs>, // [2B, 1]
        local: Option<B::Pairs>,  // [nl·B, 2]
    }
}

impl<B: Backend> DinoPairs<B> {
    fn ensure(&mut self, be: &mut B, b: usize, nl: usize) -> Result<()> {
        if self.key == Some((b, nl)) {
            return Ok(());
        }
        let scale = (1.0 / (b as f64 * dino_loss_denominator(nl) as f64)) as f32;
        // Rows are crop-major: global row r (crop r / B) pairs with the other crop's row.
        let global: Vec<i32> = (0..2 * b).map(|r| ((r + b) % (2 * b)) as i32).collect();
        let mut table = be.pairs(2 * b, 1)?;
        be.set_pairs(&mut table, 2 * b, &global, &vec![scale; 2 * b])?;
        self.global = Some(table);
        self.local = if nl > 0 {
            let teacher: Vec<i32> = (0..nl * b)
                .flat_map(|r| [(r % b) as i32, (b + r % b) as i32])
                .collect();
            let mut table = be.pairs(nl * b, 2)?;
            be.set_pairs(&mut table, nl * b, &teacher, &vec![scale; 2 * nl * b])?;
            Some(table)
        } else {
            None
        };
        self.key = Some((b, nl));
        Ok(())
    }
}

/// The student logits of one step and where their gradients go.
pub struct DinoStudent<'a, B: Backend> {
    pub global: &'a B::F32,       // [2B, K]
    pub local: &'a B::F32,        // [nl·B, K]
    pub d_global: &'a mut B::F32, // [2B, K]
    pub d_local: &'a mut B::F32,  // [nl·B, K]
}

/// Forward and backward of the DINO loss. `terms [2]` receives the unweighted
/// (`dino_global_crops_loss`, `dino_local_crops_loss`) (the local term is zero without local
/// crops); the student gradients are overwritten with `loss_weight · d loss / d logits`.
/// `teacher_probs [2B, K]` in natural row order.
#[allow(clippy::too_many_arguments)]
pub fn dino_loss_forward_backward<B: Backend>(
    be: &mut B,
    pairs: &mut DinoPairs<B>,
    terms: &mut B::F32,
    s: DinoStudent<'_, B>,
    teacher_probs: &B::F32,
    (b, nl, k): (usize, usize, usize),
    student_temp: f32,
    loss_weight: f32,
) -> Result<()> {
    const OP: &str = "dino loss";
    if b == 0 || k == 0 {
        return Err(Error::shape(
            OP,
            format!("needs images and prototypes, got B {b}, K {k}"),
        ));
    }
    for (what, len, want) in [
        ("terms", terms.len(), 2),
        ("student global", s.global.len(), 2 * b * k),
        ("student local", s.local.len(), nl * b * k),
        ("teacher probs", teacher_probs.len(), 2 * b * k),
    ] {
        if len != want {
            return Err(Error::shape(
                OP,
                format!("{what} holds {len} values, expected {want}"),
            ));
        }
    }
    pairs.ensure(be, b, nl)?;
    let [mut global_term, mut local_term] = terms.windows_mut([0..1, 1..2])?;
    let missing = || Error::Unsupported("DINO pairs missing".into());
    let global = pairs.global.as_ref().ok_or_else(missing)?;
    be.softmax_cross_entropy(
        &mut global_term,
        s.d_global,
        s.global,
        teacher_probs,
        global,
        student_temp,
        loss_weight,
        k,
    )?;
    match pairs.local.as_ref() {
        Some(local) if nl > 0 => be.softmax_cross_entropy(
            &mut local_term,
            s.d_local,
            s.local,
            teacher_probs,
            local,
            student_temp,
            loss_weight,
            k,
        ),
        _ => be.zero_f32(&mut local_term),
    }
}

/// The terms read back from `terms [2]`, with the weighted total.
pub fn dino_terms(terms: &[f32], loss_weight: f32) -> DinoLossTerms {
    let (global, local) = (terms[0] as f64, terms[1] as f64);
    DinoLossTerms {
        local: local as f32,
        global: global as f32,
        total: (loss_weight as f64 * (local + global)) as f32,
    }
}
