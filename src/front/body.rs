//! Bodies on their way through the front door, either way, streamed: a body that stays
//! silent longer than `upstream.idle_timeout` between two pieces fails (a stalled client
//! or app must not hold a connection for ever, also not on a busy HTTP/2 connection,
//! whose other streams keep the connection's own idle timer from firing); a request body
//! also says when it has ended (the wait for the app's answer starts then, not while a
//! slow client is still uploading) and whether it failed.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body::{Body as _, Frame, SizeHint};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

/// A body with an idle limit, and for a request body, its end and failure reported.
pub(super) struct Guarded {
    inner: Body,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    /// Fired once the body has ended (request bodies).
    ended: Option<oneshot::Sender<()>>,
    /// Set when the body failed: broken off, badly framed or idle too long.
    failed: Option<Arc<AtomicBool>>,
}

impl Guarded {
    /// A request body: its end is sent on `ended`, its failure set in `failed`.
    pub(super) fn request(
        inner: Body,
        idle: Duration,
        ended: oneshot::Sender<()>,
        failed: Arc<AtomicBool>,
    ) -> Self {
        let mut body = Self::response(inner, idle);
        body.failed = Some(failed);
        if body.inner.is_end_stream() {
            let _ = ended.send(());
        } else {
            body.ended = Some(ended);
        }
        body
    }

    /// An answer body from the app.
    pub(super) fn response(inner: Body, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            ended: None,
            failed: None,
        }
    }

    fn end(&mut self) {
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(());
        }
    }

    fn fail(&mut self) {
        if let Some(failed) = &self.failed {
            failed.store(true, Ordering::Relaxed);
        }
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = Instant::now() + this.idle;
                this.timer.as_mut().reset(next);
                if this.inner.is_end_stream() {
                    this.end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                this.fail();
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                this.end();
                Poll::Ready(None)
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.fail();
                    Poll::Ready(Some(Err(axum::Error::new(IdleTooLong(this.idle)))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?} (upstream.idle_timeout)")]
struct IdleTooLong(Duration);
