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

/// A progress callback that maps a sub-operation's 0→1 onto `lo..hi` of `outer`'s, its
/// messages prefixed with `prefix`; a cancellation of `outer` sets `cancel`, the flag of the
/// sub-operation's own [`Ctx`]. Use: `let p = sub_range(ctx, &flag, lo, hi, "round 2/6: ");`
/// then `Ctx::new(&p, &flag)`.
pub fn sub_range<'a>(
    outer: &'a Ctx<'a>,
    cancel: &'a AtomicBool,
    lo: f64,
    hi: f64,
    prefix: &'a str,
) -> impl Fn(f64, &str) + Sync + 'a {
    move |f: f64, msg: &str| {
        if outer.check().is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        outer.report(
            lo + f.clamp(0.0, 1.0) * (hi - lo),
            &format!("{prefix}{msg}"),
        );
    }
}
