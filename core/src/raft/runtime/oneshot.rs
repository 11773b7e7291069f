//! Oneshot channel: [`futures_channel::oneshot`] behind openraft's traits.

use futures_channel::oneshot;
use openraft::async_runtime::Oneshot;
use openraft::OptionalSend;

/// The oneshot channel of [`super::GlommioRuntime`].
#[derive(Debug, Clone, Copy, Default)]
pub struct GlommioOneshot;

impl Oneshot for GlommioOneshot {
    type Sender<T: OptionalSend> = OneshotSender<T>;
    /// Resolves to `Err(Canceled)` when the sender is dropped without sending.
    type Receiver<T: OptionalSend> = oneshot::Receiver<T>;
    type ReceiverError = oneshot::Canceled;

    fn channel<T: OptionalSend>() -> (Self::Sender<T>, Self::Receiver<T>) {
        let (tx, rx) = oneshot::channel();
        (OneshotSender(tx), rx)
    }
}

/// Sending half of a oneshot channel.
#[derive(Debug)]
pub struct OneshotSender<T>(oneshot::Sender<T>);

impl<T: OptionalSend> openraft::async_runtime::OneshotSender<T> for OneshotSender<T> {
    /// Gives the value back if the receiver is gone.
    fn send(self, t: T) -> Result<(), T> {
        self.0.send(t)
    }
}
