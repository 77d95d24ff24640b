//! The context every operation runs with: a progress callback and a cancel flag.

use std::sync::atomic::{AtomicBool, Ordering};

use super::{Error, Result};

/// Progress reporting and cooperative cancellation for one operation.
pub struct Ctx<'a> {
    progress: &'a (dyn Fn(f64, &str) + Sync),
    cancel: &'a AtomicBool,
}

impl<'a> Ctx<'a> {
    /// A context reporting to `progress` (fraction in [0, 1], message) and stopping when
    /// `cancel` becomes true.
    pub fn new(progress: &'a (dyn Fn(f64, &str) + Sync), cancel: &'a AtomicBool) -> Self {
        Self { progress, cancel }
    }

    /// Report progress of the current operation.
    pub fn report(&self, fraction: f64, message: &str) {
        (self.progress)(fraction.clamp(0.0, 1.0), message);
    }

    /// Fail with [`Error::Cancelled`] if cancellation was asked for. Operations call this
    /// between tensors / layers / batches.
    pub fn check(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}
