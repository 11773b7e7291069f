//! Watch channel (single value, change notification) for tasks of one executor.
//!
//! The value carries a version, bumped by every send; each receiver remembers the last version
//! it has seen. Waiting receivers are woken all at once on a change or when the last sender goes.

use std::cell::{Ref, RefCell};
use std::collections::BTreeMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

use openraft::async_runtime::watch::{RecvError, SendError, Watch};
use openraft::{OptionalSend, OptionalSync};

/// The watch channel of [`super::GlommioRuntime`].
#[derive(Debug, Clone, Copy, Default)]
pub struct GlommioWatch;

impl Watch for GlommioWatch {
    type Sender<T: OptionalSend + OptionalSync> = WatchSender<T>;
    type Receiver<T: OptionalSend + OptionalSync> = WatchReceiver<T>;
    type Ref<'a, T: OptionalSend + 'a> = Ref<'a, T>;

    fn channel<T: OptionalSend + OptionalSync>(init: T) -> (Self::Sender<T>, Self::Receiver<T>) {
        let shared = Rc::new(Shared {
            value: RefCell::new(init),
            state: RefCell::new(State {
                version: 0,
                senders: 1,
                receivers: 1,
                waiting: BTreeMap::new(),
                next_receiver_id: 1,
            }),
        });
        let rx = WatchReceiver {
            shared: shared.clone(),
            seen: 0,
            id: 0,
        };
        (WatchSender { shared }, rx)
    }
}

struct Shared<T> {
    /// Separate from `state` so a receiver's `Ref` does not block bookkeeping.
    value: RefCell<T>,
    state: RefCell<State>,
}

struct State {
    /// Bumped by every change of `value`.
    version: u64,
    senders: usize,
    receivers: usize,
    /// Wakers of receivers inside `changed()`, by receiver id.
    waiting: BTreeMap<u64, Waker>,
    next_receiver_id: u64,
}

impl<T> Shared<T> {
    /// Records a change and wakes every waiting receiver.
    fn notify_changed(&self) {
        let waiting = {
            let mut state = self.state.borrow_mut();
            state.version += 1;
            std::mem::take(&mut state.waiting)
        };
        for waker in waiting.into_values() {
            waker.wake();
        }
    }

    fn new_receiver(self: &Rc<Self>, seen: u64) -> WatchReceiver<T> {
        let mut state = self.state.borrow_mut();
        state.receivers += 1;
        let id = state.next_receiver_id;
        state.next_receiver_id += 1;
        WatchReceiver {
            shared: self.clone(),
            seen,
            id,
        }
    }
}

/// Sending half; clones share the value. Receivers see the channel closed when the last one goes.
pub struct WatchSender<T> {
    shared: Rc<Shared<T>>,
}

impl<T> Clone for WatchSender<T> {
    fn clone(&self) -> Self {
        self.shared.state.borrow_mut().senders += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for WatchSender<T> {
    fn drop(&mut self) {
        let waiting = {
            let mut state = self.shared.state.borrow_mut();
            state.senders -= 1;
            if state.senders > 0 {
                return;
            }
            std::mem::take(&mut state.waiting)
        };
        for waker in waiting.into_values() {
            waker.wake();
        }
    }
}

impl<T: OptionalSend + OptionalSync> openraft::async_runtime::watch::WatchSender<GlommioWatch, T>
    for WatchSender<T>
{
    /// Fails, keeping the old value, when no receiver is left.
    ///
    /// Panics if a `Ref` to the value is alive (see the module caveats of `runtime`).
    fn send(&self, value: T) -> Result<(), SendError<T>> {
        if self.shared.state.borrow().receivers == 0 {
            return Err(SendError(value));
        }
        *self.shared.value.borrow_mut() = value;
        self.shared.notify_changed();
        Ok(())
    }

    fn send_if_modified<F>(&self, modify: F) -> bool
    where
        F: FnOnce(&mut T) -> bool,
    {
        let modified = modify(&mut self.shared.value.borrow_mut());
        if modified {
            self.shared.notify_changed();
        }
        modified
    }

    fn borrow_watched(&self) -> Ref<'_, T> {
        self.shared.value.borrow()
    }

    /// The new receiver has seen the current value.
    fn subscribe(&self) -> WatchReceiver<T> {
        let version = self.shared.state.borrow().version;
        self.shared.new_receiver(version)
    }
}

/// Receiving half; a clone starts with the same seen version.
pub struct WatchReceiver<T> {
    shared: Rc<Shared<T>>,
    /// Version of the newest value this receiver has marked seen.
    seen: u64,
    /// Key of this receiver's waker in `State::waiting`.
    id: u64,
}

impl<T> Clone for WatchReceiver<T> {
    fn clone(&self) -> Self {
        self.shared.new_receiver(self.seen)
    }
}

impl<T> Drop for WatchReceiver<T> {
    fn drop(&mut self) {
        let mut state = self.shared.state.borrow_mut();
        state.receivers -= 1;
        state.waiting.remove(&self.id);
    }
}

impl<T: OptionalSend + OptionalSync> openraft::async_runtime::watch::WatchReceiver<GlommioWatch, T>
    for WatchReceiver<T>
{
    async fn changed(&mut self) -> Result<(), RecvError> {
        poll_fn(|cx| {
            let mut state = self.shared.state.borrow_mut();
            if state.version != self.seen {
                self.seen = state.version;
                state.waiting.remove(&self.id);
                return Poll::Ready(Ok(()));
            }
            if state.senders == 0 {
                return Poll::Ready(Err(RecvError(())));
            }
            state.waiting.insert(self.id, cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    fn borrow_watched(&self) -> Ref<'_, T> {
        self.shared.value.borrow()
    }

    fn borrow_and_update(&mut self) -> Ref<'_, T> {
        self.seen = self.shared.state.borrow().version;
        self.shared.value.borrow()
    }
}
