//! Async mutex: [`futures_util::lock::Mutex`] behind openraft's trait.

use std::future::Future;

use futures_util::lock::{Mutex, MutexGuard};
use openraft::OptionalSend;

/// The async mutex of [`super::GlommioRuntime`]: waiting lockers are woken one at a time, and a
/// woken locker that is cancelled passes its turn on.
#[derive(Debug)]
pub struct GlommioMutex<T>(Mutex<T>);

impl<T: OptionalSend + 'static> openraft::async_runtime::Mutex<T> for GlommioMutex<T> {
    type Guard<'a> = MutexGuard<'a, T>;

    fn new(value: T) -> Self {
        Self(Mutex::new(value))
    }

    fn lock(&self) -> impl Future<Output = MutexGuard<'_, T>> + OptionalSend {
        self.0.lock()
    }
}
