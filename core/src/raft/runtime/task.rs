//! Spawned tasks: [`JoinHandle`] and [`JoinError`].

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What a caught panic carries (the argument of `panic!`).
type PanicPayload = Box<dyn Any + Send + 'static>;

/// Handle to a task spawned by [`super::GlommioRuntime`]: a future of the task's output.
///
/// Dropping it detaches the task (it keeps running); [`JoinHandle::abort`] cancels it.
pub struct JoinHandle<T> {
    inner: glommio::task::JoinHandle<Result<T, PanicPayload>>,
}

impl<T> JoinHandle<T> {
    pub(super) fn new(inner: glommio::task::JoinHandle<Result<T, PanicPayload>>) -> Self {
        Self { inner }
    }

    /// Cancels the task: it is not polled again and its future is dropped on the executor's next
    /// turn. Awaiting the handle then yields [`JoinError::Cancelled`], unless the task had
    /// already finished. No effect on a finished task.
    pub fn abort(&self) {
        self.inner.cancel();
    }
}

impl<T> fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle").finish_non_exhaustive()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // glommio yields `None` for a task that was cancelled (panics are caught in `spawn`).
        Pin::new(&mut self.inner).poll(cx).map(|out| match out {
            Some(Ok(value)) => Ok(value),
            Some(Err(payload)) => Err(JoinError::Panicked(payload)),
            None => Err(JoinError::Cancelled),
        })
    }
}

/// Why a spawned task produced no output.
pub enum JoinError {
    /// The task was cancelled ([`JoinHandle::abort`]) before it finished.
    Cancelled,
    /// The task panicked; holds the panic payload.
    Panicked(PanicPayload),
}

impl JoinError {
    /// True if the task panicked.
    pub fn is_panic(&self) -> bool {
        matches!(self, Self::Panicked(_))
    }

    /// True if the task was cancelled.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Self::Cancelled)
    }

    /// The panic message, when the payload is a string (as `panic!("...")` makes).
    pub fn panic_message(&self) -> Option<&str> {
        let Self::Panicked(payload) = self else {
            return None;
        };
        payload
            .downcast_ref::<&'static str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
    }
}

impl fmt::Debug for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cancelled => f.write_str("Cancelled"),
            Self::Panicked(_) => f
                .debug_tuple("Panicked")
                .field(&self.panic_message().unwrap_or("<non-string payload>"))
                .finish(),
        }
    }
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cancelled => f.write_str("task was cancelled"),
            Self::Panicked(_) => match self.panic_message() {
                Some(msg) => write!(f, "task panicked: {msg}"),
                None => f.write_str("task panicked"),
            },
        }
    }
}

impl std::error::Error for JoinError {}
