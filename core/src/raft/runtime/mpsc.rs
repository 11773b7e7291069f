//! Bounded multi-producer, single-consumer channel for tasks of one executor.
//!
//! Senders that find the queue full wait in FIFO order; each receive wakes the oldest waiter. A
//! woken send that is dropped before it runs passes the wake-up on, so a cancelled send never
//! strands the others.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};

use openraft::async_runtime::{Mpsc, SendError, TryRecvError};
use openraft::OptionalSend;

/// The bounded mpsc of [`super::GlommioRuntime`].
#[derive(Debug, Clone, Copy, Default)]
pub struct GlommioMpsc;

impl Mpsc for GlommioMpsc {
    type Sender<T: OptionalSend> = MpscSender<T>;
    type Receiver<T: OptionalSend> = MpscReceiver<T>;
    type WeakSender<T: OptionalSend> = MpscWeakSender<T>;

    /// Panics if `buffer` is 0 (a bounded channel needs room for one message).
    fn channel<T: OptionalSend>(buffer: usize) -> (Self::Sender<T>, Self::Receiver<T>) {
        assert!(buffer > 0, "mpsc channel capacity must be at least 1");
        let chan = Rc::new(RefCell::new(Chan {
            queue: VecDeque::with_capacity(buffer.min(QUEUE_PREALLOC_MAX)),
            capacity: buffer,
            senders: 1,
            receiver_alive: true,
            recv_waker: None,
            send_waiters: BTreeMap::new(),
            next_waiter_id: 0,
        }));
        let sender = MpscSender { chan: chan.clone() };
        (sender, MpscReceiver { chan })
    }
}

/// Most slots allocated up front; larger channels grow on demand.
const QUEUE_PREALLOC_MAX: usize = 1024;

struct Chan<T> {
    queue: VecDeque<T>,
    capacity: usize,
    /// Strong senders alive; the channel is closed for the receiver when this reaches 0.
    senders: usize,
    receiver_alive: bool,
    recv_waker: Option<Waker>,
    /// Senders waiting for room, oldest (smallest id) first.
    send_waiters: BTreeMap<u64, Waker>,
    next_waiter_id: u64,
}

impl<T> Chan<T> {
    fn has_room(&self) -> bool {
        self.queue.len() < self.capacity
    }

    /// Removes the oldest waiting sender, to be woken once the borrow is released.
    fn pop_send_waiter(&mut self) -> Option<Waker> {
        self.send_waiters.pop_first().map(|(_, waker)| waker)
    }
}

/// Sending half; clone it for more producers.
pub struct MpscSender<T> {
    chan: Rc<RefCell<Chan<T>>>,
}

impl<T> Clone for MpscSender<T> {
    fn clone(&self) -> Self {
        self.chan.borrow_mut().senders += 1;
        Self {
            chan: self.chan.clone(),
        }
    }
}

impl<T> Drop for MpscSender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut chan = self.chan.borrow_mut();
            chan.senders -= 1;
            if chan.senders > 0 {
                return;
            }
            chan.recv_waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T: OptionalSend> openraft::async_runtime::MpscSender<GlommioMpsc, T> for MpscSender<T> {
    fn send(&self, msg: T) -> impl Future<Output = Result<(), SendError<T>>> + OptionalSend {
        SendFuture {
            chan: &self.chan,
            msg: Some(msg),
            waiter_id: None,
        }
    }

    fn downgrade(&self) -> MpscWeakSender<T> {
        MpscWeakSender {
            chan: Rc::downgrade(&self.chan),
        }
    }
}

/// A pending [`MpscSender::send`](openraft::async_runtime::MpscSender::send).
struct SendFuture<'a, T> {
    chan: &'a Rc<RefCell<Chan<T>>>,
    msg: Option<T>,
    /// Our place in `send_waiters` once we had to wait; kept across wake-ups to stay in line.
    waiter_id: Option<u64>,
}

// `msg` is moved in and out by value, never pinned.
impl<T> Unpin for SendFuture<'_, T> {}

impl<T> Future for SendFuture<'_, T> {
    type Output = Result<(), SendError<T>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut chan = this.chan.borrow_mut();
        let Some(msg) = this.msg.take() else {
            panic!("mpsc send future polled after completion");
        };
        let waiter_id = this.waiter_id.take();
        if let Some(id) = waiter_id {
            chan.send_waiters.remove(&id);
        }
        if !chan.receiver_alive {
            return Poll::Ready(Err(SendError(msg)));
        }
        if chan.has_room() {
            chan.queue.push_back(msg);
            let waker = chan.recv_waker.take();
            drop(chan);
            if let Some(waker) = waker {
                waker.wake();
            }
            return Poll::Ready(Ok(()));
        }
        this.msg = Some(msg);
        let id = waiter_id.unwrap_or_else(|| {
            let id = chan.next_waiter_id;
            chan.next_waiter_id += 1;
            id
        });
        chan.send_waiters.insert(id, cx.waker().clone());
        this.waiter_id = Some(id);
        Poll::Pending
    }
}

impl<T> Drop for SendFuture<'_, T> {
    fn drop(&mut self) {
        let Some(id) = self.waiter_id else {
            return;
        };
        let mut chan = self.chan.borrow_mut();
        let still_waiting = chan.send_waiters.remove(&id).is_some();
        // Woken for a free slot but cancelled before using it: hand the wake-up on.
        let next = if !still_waiting && chan.has_room() {
            chan.pop_send_waiter()
        } else {
            None
        };
        drop(chan);
        if let Some(waker) = next {
            waker.wake();
        }
    }
}

/// Receiving half.
pub struct MpscReceiver<T> {
    chan: Rc<RefCell<Chan<T>>>,
}

impl<T> MpscReceiver<T> {
    /// Takes the next message and wakes the oldest waiting sender; `Err` says why there is none.
    fn take(&mut self) -> Result<T, TryRecvError> {
        let mut chan = self.chan.borrow_mut();
        let Some(msg) = chan.queue.pop_front() else {
            return Err(if chan.senders == 0 {
                TryRecvError::Disconnected
            } else {
                TryRecvError::Empty
            });
        };
        let waker = chan.pop_send_waiter();
        drop(chan);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(msg)
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        match self.take() {
            Ok(msg) => Poll::Ready(Some(msg)),
            Err(TryRecvError::Disconnected) => Poll::Ready(None),
            Err(TryRecvError::Empty) => {
                self.chan.borrow_mut().recv_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T> Drop for MpscReceiver<T> {
    fn drop(&mut self) {
        let (queued, waiters) = {
            let mut chan = self.chan.borrow_mut();
            chan.receiver_alive = false;
            chan.recv_waker = None;
            let queued = std::mem::take(&mut chan.queue);
            let waiters = std::mem::take(&mut chan.send_waiters);
            (queued, waiters)
        };
        // Undelivered messages are dropped now (a message may own a sender of this channel, so
        // not while the channel is borrowed); waiting senders wake up to their error.
        drop(queued);
        for waker in waiters.into_values() {
            waker.wake();
        }
    }
}

impl<T: OptionalSend> openraft::async_runtime::MpscReceiver<T> for MpscReceiver<T> {
    fn recv(&mut self) -> impl Future<Output = Option<T>> + OptionalSend {
        poll_fn(|cx| self.poll_recv(cx))
    }

    fn try_recv(&mut self) -> Result<T, TryRecvError> {
        self.take()
    }
}

/// A sender that does not keep the channel open.
pub struct MpscWeakSender<T> {
    chan: Weak<RefCell<Chan<T>>>,
}

impl<T> Clone for MpscWeakSender<T> {
    fn clone(&self) -> Self {
        Self {
            chan: self.chan.clone(),
        }
    }
}

impl<T: OptionalSend> openraft::async_runtime::MpscWeakSender<GlommioMpsc, T>
    for MpscWeakSender<T>
{
    fn upgrade(&self) -> Option<MpscSender<T>> {
        let chan = self.chan.upgrade()?;
        {
            let mut state = chan.borrow_mut();
            if state.senders == 0 {
                return None;
            }
            state.senders += 1;
        }
        Some(MpscSender { chan })
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    use openraft::async_runtime::{
        Mpsc as _, MpscReceiver as _, MpscSender as _, MpscWeakSender as _,
    };

    use super::*;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl CountingWaker {
        fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn poll_with<F: Future>(fut: Pin<&mut F>, waker: &Arc<CountingWaker>) -> Poll<F::Output> {
        let waker = Waker::from(waker.clone());
        fut.poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn cancelled_woken_sender_passes_the_wakeup_on() {
        let (tx, mut rx) = GlommioMpsc::channel::<u32>(1);
        let (wa, wb) = (Arc::default(), Arc::default());
        assert!(poll_with(pin!(tx.send(0)), &wa).is_ready());

        let mut a = Box::pin(tx.send(1));
        let mut b = pin!(tx.send(2));
        assert!(poll_with(a.as_mut(), &wa).is_pending());
        assert!(poll_with(b.as_mut(), &wb).is_pending());

        assert_eq!(rx.try_recv(), Ok(0));
        assert_eq!(
            (wa.count(), wb.count()),
            (1, 0),
            "oldest waiter woken first"
        );
        drop(a);
        assert_eq!(wb.count(), 1, "cancelled waiter handed its turn on");
        assert!(matches!(poll_with(b.as_mut(), &wb), Poll::Ready(Ok(()))));
        assert_eq!(rx.try_recv(), Ok(2));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn woken_sender_keeps_its_place_in_line() {
        let (tx, mut rx) = GlommioMpsc::channel::<u32>(1);
        let (wa, wb) = (Arc::default(), Arc::default());
        assert!(poll_with(pin!(tx.send(0)), &wa).is_ready());
        let mut a = pin!(tx.send(1));
        let mut b = pin!(tx.send(2));
        assert!(poll_with(a.as_mut(), &wa).is_pending());
        assert!(poll_with(b.as_mut(), &wb).is_pending());

        // A newcomer takes the freed slot before the woken waiter runs.
        assert_eq!(rx.try_recv(), Ok(0));
        assert!(poll_with(pin!(tx.send(9)), &wb).is_ready());
        assert!(poll_with(a.as_mut(), &wa).is_pending());

        assert_eq!(rx.try_recv(), Ok(9));
        assert_eq!(
            (wa.count(), wb.count()),
            (2, 0),
            "`a` is still first in line"
        );
        assert!(poll_with(a.as_mut(), &wa).is_ready());
    }

    #[test]
    fn dropping_the_receiver_drops_queued_messages_and_fails_waiting_senders() {
        // A queued message owning a sender of the same channel must not re-enter its borrow.
        let (tx, rx) = GlommioMpsc::channel::<Option<Box<dyn std::any::Any>>>(1);
        let w: Arc<CountingWaker> = Arc::default();
        let inner = Box::new(tx.clone());
        assert!(poll_with(pin!(tx.send(Some(inner))), &w).is_ready());
        let mut blocked = pin!(tx.send(None));
        assert!(poll_with(blocked.as_mut(), &w).is_pending());

        drop(rx);
        assert_eq!(w.count(), 1);
        assert!(matches!(
            poll_with(blocked.as_mut(), &w),
            Poll::Ready(Err(SendError(None)))
        ));
        assert_eq!(Rc::strong_count(&tx.chan), 1, "queued sender was dropped");
    }

    #[test]
    fn last_sender_closes_and_weak_senders_do_not_count() {
        let (tx, mut rx) = GlommioMpsc::channel::<u32>(4);
        let weak = tx.downgrade();
        let again = weak.upgrade().expect("a sender is alive");
        drop(tx);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        drop(again);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
        assert!(weak.upgrade().is_none());
    }

    #[test]
    #[should_panic(expected = "capacity must be at least 1")]
    fn zero_capacity_is_refused() {
        let _ = GlommioMpsc::channel::<u32>(0);
    }
}
