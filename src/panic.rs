//! Panic containment: a panic while serving one request is caught where the request is handled,
//! counted, and logged once with what the request was, and the listener goes on.
//!
//! The process-wide hook records the panic's message and location instead of printing it when
//! the panicking thread is inside [`catch`] or a [`Guarded`] future; the catch site then logs one
//! line with the message and its own context (the query name, the client). Other panics are
//! printed as usual.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

thread_local! {
    static CATCHING: Cell<u32> = const { Cell::new(0) };
    static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs the hook (once, from the binary; tests may call it too).
pub fn install_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CATCHING.with(Cell::get) > 0 {
                let text = match info.location() {
                    Some(l) => format!("{} at {}:{}", payload_text(info.payload()), l.file(), l.line()),
                    None => payload_text(info.payload()),
                };
                LAST.with(|s| *s.borrow_mut() = Some(text));
            } else {
                default(info);
            }
        }));
    });
}

fn payload_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_owned()
    }
}

/// What a caught panic said (message and location, when the hook saw it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caught(pub String);

impl std::fmt::Display for Caught {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

struct Catching;

impl Catching {
    fn enter() -> Self {
        CATCHING.with(|c| c.set(c.get() + 1));
        Catching
    }
}

impl Drop for Catching {
    fn drop(&mut self) {
        CATCHING.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

fn caught(payload: Box<dyn std::any::Any + Send>) -> Caught {
    Caught(LAST.with(|s| s.borrow_mut().take()).unwrap_or_else(|| payload_text(payload.as_ref())))
}

/// Runs `f`, turning a panic into `Err` with its message.
pub fn catch<R>(f: impl FnOnce() -> R) -> Result<R, Caught> {
    let _g = Catching::enter();
    catch_unwind(AssertUnwindSafe(f)).map_err(caught)
}

/// A future whose panics (in any poll) become `Err`; it is not polled again after one.
pub struct Guarded<F> {
    inner: F,
    done: bool,
}

pub fn guarded<F: Future>(inner: F) -> Guarded<F> {
    Guarded { inner, done: false }
}

impl<F: Future> Future for Guarded<F> {
    type Output = Result<F::Output, Caught>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `inner` is never moved out of the pinned struct; `done` is plain data.
        let this = unsafe { self.get_unchecked_mut() };
        if this.done {
            return Poll::Ready(Err(Caught("polled after a panic".into())));
        }
        // SAFETY: `this` is pinned, so `inner` stays where it is until dropped.
        let inner = unsafe { Pin::new_unchecked(&mut this.inner) };
        let _g = Catching::enter();
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(p) => {
                this.done = true;
                Poll::Ready(Err(caught(p)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catch_reports_message_and_location() {
        install_hook();
        let e = catch(|| -> u32 { panic!("boom {}", 7) }).unwrap_err();
        assert!(e.0.starts_with("boom 7 at src/panic.rs:"), "{e}");
        assert_eq!(catch(|| 5).unwrap(), 5);
    }

    #[tokio::test]
    async fn guarded_future_reports_a_panic_after_an_await() {
        install_hook();
        let r = guarded(async {
            tokio::task::yield_now().await;
            if std::hint::black_box(true) {
                panic!("late");
            }
            1
        })
        .await;
        assert!(r.unwrap_err().0.starts_with("late at "));
        assert_eq!(guarded(async { 2 }).await.unwrap(), 2);
    }
}
