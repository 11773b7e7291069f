//! Timers: [`Sleep`] and [`Timeout`] over glommio's reactor timers.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use glommio::timer::Timer;
use pin_project_lite::pin_project;

/// A future that completes at (never before) a deadline.
///
/// The glommio timer is armed on the first poll that finds the deadline in the future, so a
/// `Sleep` can be built outside an executor and one already due costs no timer.
#[derive(Debug)]
pub struct Sleep {
    deadline: Instant,
    timer: Option<Timer>,
}

impl Sleep {
    /// A sleep that ends at `deadline`.
    pub fn until(deadline: Instant) -> Self {
        Self {
            deadline,
            timer: None,
        }
    }

    /// When this sleep ends.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let now = Instant::now();
        if now >= self.deadline {
            // Dropping the timer deregisters it from the reactor.
            self.timer = None;
            return Poll::Ready(());
        }
        let remaining = self.deadline - now;
        // The glommio timer fires at `now + remaining` or later, i.e. not before the deadline.
        let timer = self.timer.get_or_insert_with(|| Timer::new(remaining));
        Pin::new(timer).poll(cx).map(|_fired_at| ())
    }
}

pin_project! {
    /// A future that yields `future`'s output, or [`TimeoutError`] if the deadline comes first.
    ///
    /// `future` is polled before the deadline is checked, so a ready future wins a tie.
    #[derive(Debug)]
    pub struct Timeout<R, F> {
        #[pin]
        future: F,
        sleep: Sleep,
        allowed: Duration,
        _output: PhantomData<fn() -> R>,
    }
}

impl<R, F> Timeout<R, F> {
    /// `future` with a deadline.
    pub fn new(future: F, deadline: Instant) -> Self {
        Self {
            future,
            sleep: Sleep::until(deadline),
            allowed: deadline.saturating_duration_since(Instant::now()),
            _output: PhantomData,
        }
    }
}

impl<R, F: Future<Output = R>> Future for Timeout<R, F> {
    type Output = Result<R, TimeoutError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.future.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        match Pin::new(this.sleep).poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(TimeoutError {
                allowed: *this.allowed,
            })),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The deadline of a [`Timeout`] passed before its future completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline elapsed after {allowed:?}")]
pub struct TimeoutError {
    /// Time the future was given, measured when the timeout was created.
    pub allowed: Duration,
}
