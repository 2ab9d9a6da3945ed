//! The sink driver: keeps a destination's requests in flight, trips the
//! circuit breaker, stops at a destination's refusal, and hands outcomes
//! back in chunks for acknowledgement. It runs as one task that polls every
//! request in flight itself (no task per request: on a fast receiver the
//! spawning and waking of one cost more than the request's own work);
//! whatever way it stops (the queue drained, an early stop,
//! [`Driver::cancel`], [`Driver::drain`]), every request has ended or been
//! dropped before [`Driver::finish`] returns: nothing is left sending.

use crate::request::{Batch, Destination, Settled};
use crate::{MetaContext, Outcome, Sender};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Outcomes of delivered requests, in chunks: each request's records with
/// the outcome they share.
pub type Results = mpsc::UnboundedReceiver<Vec<Settled>>;

/// What the driver sends and how.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Builds, splits and sends requests.
    pub destination: Destination,
    /// The destination's client.
    pub sender: Sender,
    /// Sync, mode and run id, for the metadata.
    pub ctx: MetaContext,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Requests in a row that fail with retryable errors (after their
    /// retries) before delivery stops early.
    pub breaker: u32,
}

/// A running driver.
/// Dropped without [`Driver::finish`] (its caller was dropped), it cancels
/// the task, which then cancels every request.
#[derive(Debug)]
pub struct Driver {
    task: tokio::task::JoinHandle<Option<String>>,
    cancel: CancellationToken,
    guard: tokio_util::sync::DropGuard,
    drain: Drain,
}

/// The drain token, with a flag the driver reads each turn without the
/// token's lock.
#[derive(Debug, Clone, Default)]
struct Drain {
    token: CancellationToken,
    asked: Arc<AtomicBool>,
}

impl Drain {
    fn ask(&self) {
        self.asked.store(true, Ordering::Release);
        self.token.cancel();
    }

    fn asked(&self) -> bool {
        self.asked.load(Ordering::Acquire)
    }
}

/// Outcomes are handed back once a chunk holds this many records (whole
/// requests, so a large batch makes a larger chunk), or after
/// [`RESULT_INTERVAL`].
const RESULT_CHUNK: usize = 1024;
const RESULT_INTERVAL: Duration = Duration::from_millis(50);

impl Driver {
    /// Starts sending the batches that arrive on `queue` (in chunks), until
    /// it closes and is drained; outcomes come back on the returned
    /// [`Results`].
    pub fn start(mut delivery: Delivery, queue: mpsc::Receiver<Vec<Batch>>) -> (Driver, Results) {
        let (results_tx, results) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let drain = Drain::default();
        // Once draining, failed requests are not retried.
        delivery.sender = delivery.sender.stopping_on(drain.token.clone());
        let run = Run {
            n: Arc::new(delivery),
            queue,
            results: results_tx,
            cancel: cancel.clone(),
            drain: drain.clone(),
            in_flight: FuturesUnordered::new(),
            chunk: Vec::with_capacity(RESULT_CHUNK),
            in_chunk: 0,
        };
        (
            Driver {
                task: tokio::spawn(tracing::Instrument::in_current_span(run.run())),
                guard: cancel.clone().drop_guard(),
                cancel,
                drain,
            },
            results,
        )
    }

    /// Stops at once: requests in flight are cancelled (their records stay
    /// unconfirmed, as after a crash) and nothing more is sent.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Stops starting requests; those in flight end as they would (their
    /// outcomes still come back).
    pub fn drain(&self) {
        self.drain.ask();
    }

    /// Waits until every request has ended or been dropped; says why delivery stopped
    /// early, if it did.
    pub async fn finish(self) -> Option<String> {
        let Driver { task, guard, .. } = self;
        let stopped = task
            .await
            .unwrap_or_else(|e| Some(format!("stopped early: the sending task failed ({e}); the rest stays pending")));
        // The task has ended: nothing is left to cancel.
        guard.disarm();
        stopped
    }
}

/// A request in flight: its records' outcomes when it ends (or its panic).
type InFlight = Pin<Box<dyn Future<Output = std::thread::Result<Vec<Settled>>> + Send>>;

/// The driver's task.
struct Run {
    n: Arc<Delivery>,
    queue: mpsc::Receiver<Vec<Batch>>,
    results: mpsc::UnboundedSender<Vec<Settled>>,
    cancel: CancellationToken,
    drain: Drain,
    in_flight: FuturesUnordered<InFlight>,
    chunk: Vec<Settled>,
    /// Records in `chunk`.
    in_chunk: usize,
}

impl Run {
    /// Keeps `concurrency` batches in flight until the queue closes and is
    /// drained, delivery stops early or is stopped; then ends every request
    /// task (cancelled or awaited) before returning.
    async fn run(mut self) -> Option<String> {
        let cancel = self.cancel.clone();
        let stopped = tokio::select! {
            stopped = self.send() => stopped,
            _ = cancel.cancelled() => Some("stopped: cancelled; the rest stays pending".to_string()),
        };
        // Cancelled (or stopped early): requests still in flight are
        // dropped here.
        self.in_flight.clear();
        if !self.chunk.is_empty() {
            let _ = self.results.send(std::mem::take(&mut self.chunk));
        }
        stopped
    }

    async fn send(&mut self) -> Option<String> {
        let n = self.n.clone();
        let mut local: VecDeque<Batch> = VecDeque::new();
        let mut open = true;
        let mut down_streak = 0u32;
        // Outcomes go back at the latest this long after the first of a
        // chunk came (a timer, not a clock read per request).
        let flush_due = tokio::time::sleep(RESULT_INTERVAL);
        tokio::pin!(flush_due);
        let mut flush_armed = false;
        // Why delivery stopped early; the requests in flight then end
        // (without further retries) and their outcomes still count.
        let mut stopped: Option<String> = None;
        // One wait for the drain, made once: a token's wait takes its lock.
        let drained = self.drain.token.clone().cancelled_owned();
        tokio::pin!(drained);
        loop {
            // Read once a turn; a drain asked for during the turn is seen
            // at the next.
            let draining = self.drain.asked();
            if draining && open {
                open = false;
                local.clear();
                self.queue.close();
            }
            while open && local.len() < n.concurrency {
                match self.queue.try_recv() {
                    Ok(batches) => local.extend(batches),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            while !draining && self.in_flight.len() < n.concurrency {
                let Some(batch) = local.pop_front() else { break };
                let n = n.clone();
                let request = async move { n.destination.send(&n.sender, batch, &n.ctx).await };
                // A request that panics stops delivery, not the others' outcomes.
                self.in_flight.push(Box::pin(std::panic::AssertUnwindSafe(request).catch_unwind()));
            }
            if self.in_flight.is_empty() {
                self.flush();
                if stopped.is_some() {
                    return stopped;
                }
                if draining {
                    return Some(
                        "stopped early: Backflow was asked to stop; requests in flight finished, the rest stays pending"
                            .to_string(),
                    );
                }
                if !open && local.is_empty() {
                    return None;
                }
                tokio::select! {
                    batches = self.queue.recv() => match batches {
                        Some(batches) => local.extend(batches),
                        None => open = false,
                    },
                    _ = &mut drained => {}
                }
                continue;
            }
            let done = tokio::select! {
                done = self.in_flight.next() => done,
                batches = self.queue.recv(), if open && local.is_empty() && self.in_flight.len() < n.concurrency => {
                    match batches {
                        Some(batches) => local.extend(batches),
                        None => open = false,
                    }
                    None
                }
                _ = &mut drained, if open && !draining => None,
                _ = &mut flush_due, if flush_armed => {
                    self.flush();
                    flush_armed = false;
                    None
                }
            };
            if let Some(done) = done {
                let Ok(done) = done else {
                    stopped.get_or_insert_with(|| {
                        "stopped early: a request failed inside Backflow (it panicked); the rest stays pending".into()
                    });
                    self.drain.ask();
                    continue;
                };
                let refused = done.iter().find_map(|(_, o)| match o {
                    Outcome::Failed { destination: true, reason, .. } => Some(reason.clone()),
                    _ => None,
                });
                let all_down = done.iter().all(|(_, o)| matches!(o, Outcome::Failed { retryable: true, .. }));
                down_streak = if all_down { down_streak + 1 } else { 0 };
                self.in_chunk += done.iter().map(|(records, _)| records.len()).sum::<usize>();
                self.chunk.extend(done);
                if stopped.is_none() {
                    if let Some(reason) = refused {
                        stopped = Some(format!("stopped early: {reason}; the rest stays pending"));
                    } else if down_streak >= n.breaker {
                        stopped = Some(format!(
                            "stopped early: {} requests in a row failed with retryable errors (the endpoint looks down); the rest stays pending",
                            n.breaker
                        ));
                    }
                    if stopped.is_some() {
                        // Nothing more is started; those in flight end
                        // without further retries.
                        self.drain.ask();
                    }
                }
            }
            if self.in_chunk >= RESULT_CHUNK {
                self.flush();
            }
            if self.chunk.is_empty() {
                flush_armed = false;
            } else if !flush_armed {
                flush_due.as_mut().reset(tokio::time::Instant::now() + RESULT_INTERVAL);
                flush_armed = true;
            }
        }
    }

    fn flush(&mut self) {
        if !self.chunk.is_empty() {
            // The next chunk is made whole at once, not grown request by request.
            let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(RESULT_CHUNK));
            self.in_chunk = 0;
            let _ = self.results.send(chunk);
        }
    }
}
