//! The closed flag of a broker or consumer handle.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// Whether a handle (a broker, a consumer) is still open: calls after `close` answer
/// [`Error::Closed`].
///
/// Checking is one atomic load (`Acquire`), cheap enough for a receive's hot path.
/// Closing is idempotent, and [`close`](Self::close) tells the one call that closed it,
/// so the work of closing runs once however many callers race.
///
/// ```
/// use courier_core::backend::OpenGuard;
/// use courier_core::Error;
///
/// let open = OpenGuard::new("consumer");
/// assert!(open.check().is_ok());
/// assert!(open.close(), "the first close closes");
/// assert!(!open.close(), "later ones find it closed");
/// assert!(open.is_closed());
/// assert!(matches!(open.check(), Err(Error::Closed { what: "consumer" })));
/// ```
#[derive(Debug)]
pub struct OpenGuard {
    closed: AtomicBool,
    what: &'static str,
}

impl OpenGuard {
    /// An open guard for a handle of kind `what` ("broker", "consumer"), which
    /// [`Error::Closed`] names.
    pub const fn new(what: &'static str) -> Self {
        OpenGuard { closed: AtomicBool::new(false), what }
    }

    /// `Ok` while open; [`Error::Closed`] once closed.
    #[inline]
    pub fn check(&self) -> Result<()> {
        if self.is_closed() {
            Err(Error::Closed { what: self.what })
        } else {
            Ok(())
        }
    }

    /// Whether [`close`](Self::close) has been called.
    #[inline]
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the guard. Returns `true` for the call that closed it, `false` if it was
    /// already closed: do the work of closing only on `true`.
    #[inline]
    pub fn close(&self) -> bool {
        !self.closed.swap(true, Ordering::AcqRel)
    }
}
