//! [`GlommioRuntime`]: openraft's [`AsyncRuntime`] on a glommio executor.
//!
//! openraft runs with the `single-threaded` feature: every Raft task lives on shard 0's glommio
//! `LocalExecutor`, so nothing here is `Send` and shared state is `Rc` + `RefCell`.
//!
//! How each openraft primitive maps onto glommio:
//!
//! | openraft | here | notes |
//! |---|---|---|
//! | `spawn` → `JoinHandle` | [`glommio::spawn_local`], detached ([`JoinHandle`]) | runs on the caller's executor and task queue; dropping the handle detaches (as tokio), [`JoinHandle::abort`] cancels |
//! | `JoinError`, `is_panic` | [`JoinError`] | the task is wrapped in `catch_unwind`: a panic ends that task only and is reported to whoever awaits the handle, instead of unwinding through the executor (glommio's default) |
//! | `Sleep`, `sleep`, `sleep_until` | [`Sleep`] over [`glommio::timer::Timer`] | never fires early; created lazily on first poll |
//! | `Timeout`, `timeout`, `timeout_at` | [`Timeout`] (future first, then a [`Sleep`]) | error [`TimeoutError`] |
//! | `Instant` | [`std::time::Instant`] | glommio's timers use the same clock |
//! | `ThreadLocalRng` | [`rand::rngs::ThreadRng`] | |
//! | `Mpsc` (bounded) | [`GlommioMpsc`]: `Rc` + `RefCell` queue | glommio's `local_channel` has no `try_recv` and no weak sender |
//! | `Watch` | [`GlommioWatch`]: `Rc` + `RefCell` value with a version | glommio has no watch channel |
//! | `Oneshot` | [`GlommioOneshot`] over [`futures_channel::oneshot`] | a dropped sender is reported as [`futures_channel::oneshot::Canceled`] |
//! | `Mutex` | [`GlommioMutex`] over [`futures_util::lock::Mutex`] | |
//! | `new`, `block_on` | a fresh unbound `LocalExecutor` and [`glommio::LocalExecutor::run`] | tests only; in baton the shard owns its executor |
//!
//! Caveats:
//! - Every function that spawns or arms a timer must run inside a glommio executor (glommio
//!   panics otherwise). A [`Sleep`] or [`Timeout`] may be created outside one; it touches the
//!   reactor only when polled.
//! - Timer resolution: a sleep never ends before its deadline (same monotonic clock, checked with
//!   `>=`). glommio fires due timers between task runs, so it ends late by as long as the running
//!   task keeps the thread: tasks are never preempted, a task that does not yield delays every
//!   timer of the shard (election and heartbeat timers included).
//! - When `LocalExecutor::run` returns, tasks still spawned on that executor are not polled
//!   again until the next `run` on the same executor; when the executor is dropped they are
//!   dropped without completing, and their handles never resolve. [`GlommioRuntime::block_on`]
//!   therefore returns as soon as its own future is done and does not wait for other tasks.
//! - glommio's `run` panics if an executor is already running on the thread: `block_on` cannot
//!   nest.
//! - Watch: a [`std::cell::Ref`] from `borrow_watched` borrows the value's `RefCell`; sending while a `Ref` is alive
//!   panics (it would deadlock with a lock), so never hold one across an `.await`.

mod mpsc;
mod mutex;
mod oneshot;
mod task;
mod time;
mod watch;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use openraft::OptionalSend;

pub use mpsc::{GlommioMpsc, MpscReceiver, MpscSender, MpscWeakSender};
pub use mutex::GlommioMutex;
pub use oneshot::{GlommioOneshot, OneshotSender};
pub use openraft::AsyncRuntime;
pub use task::{JoinError, JoinHandle};
pub use time::{Sleep, Timeout, TimeoutError};
pub use watch::{GlommioWatch, WatchReceiver, WatchSender};

/// openraft's async runtime on glommio: tasks, timers and channels of the current thread's
/// `LocalExecutor`. The value holds an executor only for [`AsyncRuntime::new`] and
/// [`AsyncRuntime::block_on`] (tests); Raft itself uses the associated functions.
#[derive(Debug)]
pub struct GlommioRuntime {
    executor: glommio::LocalExecutor,
}

impl GlommioRuntime {
    /// Wraps an executor built by the caller (placement, io memory, name of its choosing).
    pub fn with_executor(executor: glommio::LocalExecutor) -> Self {
        Self { executor }
    }
}

impl AsyncRuntime for GlommioRuntime {
    type JoinError = JoinError;
    type JoinHandle<T: OptionalSend + 'static> = JoinHandle<T>;
    type Sleep = Sleep;
    type Instant = std::time::Instant;
    type TimeoutError = TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = Timeout<R, T>;
    type ThreadLocalRng = rand::rngs::ThreadRng;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        // AssertUnwindSafe: a panicking task's state is dropped with it and its handle reports
        // the panic, as with tokio.
        let task = glommio::spawn_local(AssertUnwindSafe(future).catch_unwind());
        JoinHandle::new(task.detach())
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        Sleep::until(std::time::Instant::now() + duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        Sleep::until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        Timeout::new(future, std::time::Instant::now() + duration)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        Timeout::new(future, deadline)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        rand::rng()
    }

    type Mpsc = GlommioMpsc;
    type Watch = GlommioWatch;
    type Oneshot = GlommioOneshot;
    type Mutex<T: OptionalSend + 'static> = GlommioMutex<T>;

    /// A fresh, unbound executor; `threads` is ignored (one executor is one thread).
    fn new(_threads: usize) -> Self {
        let executor = glommio::LocalExecutorBuilder::default()
            .name("openraft-rt")
            .make()
            .unwrap_or_else(|e| panic!("cannot create a glommio executor: {e}"));
        Self::with_executor(executor)
    }

    fn block_on<F, T>(&mut self, future: F) -> T
    where
        F: Future<Output = T>,
    {
        self.executor.run(future)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::Instant;

    use openraft::async_runtime::{Oneshot as _, OneshotSender as _};

    use super::*;

    /// Sets its flag when dropped.
    struct DropFlag(Rc<Cell<bool>>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.set(true);
        }
    }

    #[test]
    fn abort_cancels_and_drops_the_task() {
        GlommioRuntime::new(1).block_on(async {
            let dropped = Rc::new(Cell::new(false));
            let flag = DropFlag(dropped.clone());
            let handle = GlommioRuntime::spawn(async move {
                let _flag = flag;
                std::future::pending::<u32>().await
            });
            GlommioRuntime::sleep(Duration::from_millis(1)).await;
            handle.abort();
            let err = handle.await.unwrap_err();
            assert!(
                err.is_cancelled() && !GlommioRuntime::is_panic(&err),
                "{err}"
            );
            assert!(dropped.get(), "the task's future was dropped");
        });
    }

    #[test]
    fn a_panic_ends_only_its_task() {
        let msg = GlommioRuntime::new(1).block_on(async {
            let handle = GlommioRuntime::spawn(async { panic!("boom") });
            let err: JoinError = handle.await.unwrap_err();
            assert!(GlommioRuntime::is_panic(&err));
            err.to_string()
        });
        assert_eq!(msg, "task panicked: boom");
    }

    #[test]
    fn dropping_the_handle_detaches() {
        GlommioRuntime::new(1).block_on(async {
            let (tx, rx) = GlommioOneshot::channel();
            drop(GlommioRuntime::spawn(async move {
                GlommioRuntime::sleep(Duration::from_millis(5)).await;
                tx.send(7u32).unwrap();
            }));
            assert_eq!(rx.await, Ok(7));
        });
    }

    #[test]
    fn tasks_left_at_block_on_end_resume_in_the_next_block_on() {
        let mut rt = GlommioRuntime::new(1);
        let (tx, rx) = GlommioOneshot::channel();
        // `block_on` returns once its own future is done, with the spawned task still asleep.
        let handle = rt.block_on(std::future::ready(()).map(move |()| {
            GlommioRuntime::spawn(async move {
                GlommioRuntime::sleep(Duration::from_millis(5)).await;
                tx.send(1u32).unwrap();
                2u32
            })
        }));
        let got = rt.block_on(async { (rx.await, handle.await) });
        assert_eq!((got.0, got.1.unwrap()), (Ok(1), 2));
    }

    #[test]
    fn sleep_and_timeout_never_end_early() {
        // Built outside any executor: the timer is armed on first poll.
        let sleep = GlommioRuntime::sleep(Duration::from_millis(20));
        let start = Instant::now();
        GlommioRuntime::new(1).block_on(async {
            sleep.await;
            assert!(start.elapsed() >= Duration::from_millis(20));

            let t0 = Instant::now();
            let res =
                GlommioRuntime::timeout(Duration::from_millis(15), std::future::pending::<()>())
                    .await;
            assert!(t0.elapsed() >= Duration::from_millis(15));
            let err = res.unwrap_err();
            assert!(err.allowed <= Duration::from_millis(15), "{err}");

            let due = GlommioRuntime::timeout_at(Instant::now(), async { 3 }).await;
            assert_eq!(due, Ok(3), "a ready future wins over a due deadline");
        });
    }
}
