//! A future that finishes even if the request that awaits it is dropped.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll as TaskPoll, ready};

/// A future that runs to completion even if whoever awaits it goes away: it is polled in
/// place while awaited, and what is left of it becomes a task of its own if it is dropped
/// unfinished. Why not always a task: spawning one per vote, and waking the handler when it
/// ended, cost more than the claim; a client hanging up mid-vote is the rare case.
pub(crate) struct FinishOnDrop<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    future: Option<Pin<Box<F>>>,
}

impl<F> FinishOnDrop<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    pub(crate) fn new(future: F) -> Self {
        Self {
            future: Some(Box::pin(future)),
        }
    }
}

impl<F> Future for FinishOnDrop<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> TaskPoll<F::Output> {
        let future = self.future.as_mut().expect("not polled after it finished");
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx)));
        let output = match polled {
            Ok(polled) => ready!(polled),
            Err(panic) => {
                // A future that panicked cannot go on: not one to finish on drop.
                self.future = None;
                std::panic::resume_unwind(panic);
            }
        };
        self.future = None;
        TaskPoll::Ready(output)
    }
}

impl<F> Drop for FinishOnDrop<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        let Some(rest) = self.future.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(rest);
            }
            // Only when the runtime itself is being torn down: nothing can run any more.
            Err(_) => tracing::warn!("a vote in progress was abandoned at shutdown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn work_dropped_midway_is_finished_in_a_task_of_its_own() {
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let (finished, done) = tokio::sync::oneshot::channel();
        let mut work = FinishOnDrop::new(async move {
            wait.await.unwrap();
            finished.send(()).unwrap();
        });
        // Polled for a while, as a request handler is, then dropped: the client hung up.
        let awaited = tokio::time::timeout(Duration::from_millis(20), &mut work).await;
        assert!(awaited.is_err(), "still waiting");
        drop(work);
        go.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), done)
            .await
            .expect("finished after the drop")
            .unwrap();
    }

    /// Panics the first time it is polled; counts every poll.
    struct PanicsOnFirstPoll(Arc<std::sync::atomic::AtomicUsize>);

    impl Future for PanicsOnFirstPoll {
        type Output = ();

        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> TaskPoll<()> {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("the vote path failed");
            }
            TaskPoll::Pending
        }
    }

    #[tokio::test]
    async fn work_that_panicked_is_not_finished_on_drop() {
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let work = FinishOnDrop::new(PanicsOnFirstPoll(polls.clone()));
        let caught = tokio::spawn(work).await;
        assert!(caught.unwrap_err().is_panic());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled once, never again");
    }

    #[tokio::test]
    async fn work_awaited_to_the_end_gives_its_output() {
        assert_eq!(FinishOnDrop::new(async { 42 }).await, 42);
    }
}
