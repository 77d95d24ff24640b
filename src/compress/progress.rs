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

    /// The same cancellation without progress reports: for a pass inside an operation (a
    /// validation pass between epochs) whose own 0→1 would read as the operation's.
    pub fn silent(&self) -> Ctx<'a> {
        fn quiet(_: f64, _: &str) {}
        Ctx {
            progress: &quiet,
            cancel: self.cancel,
        }
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
