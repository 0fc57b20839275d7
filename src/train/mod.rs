//! Configuration, the training loop, checkpoints and resume, logging and plots.
pub mod trainer;
