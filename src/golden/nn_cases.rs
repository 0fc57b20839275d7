//! Golden cases (see `tests/golden/README.md`).

use super::{Fixture, Outputs};
use crate::error::{Error, Result};

pub fn compute(fx: &Fixture) -> Result<Outputs> {
    Err(Error::Unsupported(format!(
        "golden case '{}' is not implemented yet",
        fx.case
    )))
}
