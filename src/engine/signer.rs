//! The signing pool. An RSA signature costs ~0.5 ms of CPU at 2048 bits and
//! several ms at 4096, and cannot be interrupted; run on the async workers,
//! or on as many threads as there are cores, a burst of uncached mints
//! holds every core and each verify that arrives meanwhile waits behind a
//! whole signature. So signatures run here, on threads of their own (one
//! per core), and while this sidecar is answering verifications (one
//! started within `VERIFYING`), at most cores − 1 of them sign at once:
//! one core is always free of signing for the next verify. Without verify
//! traffic every core signs, so mint throughput alone is unchanged.
//!
//! The threads run at normal priority and share only the queue's lock, so
//! nothing the async workers wait for is ever held by a thread the kernel
//! has set aside. A job whose caller has gone (a cancelled request) is
//! skipped, and the queue is bounded: beyond `MAX_QUEUED` waiting
//! signatures a mint is refused `unavailable` instead of piling up work.
//!
//! Threads start on the first job and end when the pool is dropped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::reason::{Reason, Refusal};

/// How recently a verification must have started for signing to leave a
/// core to verifications.
pub(crate) const VERIFYING: Duration = Duration::from_millis(5);

/// Signatures that may wait for a thread; more are refused `unavailable`.
pub(crate) const MAX_QUEUED: usize = 4096;

/// A signature to compute and the channel its result goes back on.
trait Job: Send {
    /// Whether the caller has gone, so the work would be thrown away.
    fn abandoned(&self) -> bool;
    /// Computes and sends the result.
    fn run(self: Box<Self>);
}

struct Task<F, R> {
    f: F,
    reply: oneshot::Sender<R>,
}

impl<F: FnOnce() -> R + Send, R: Send> Job for Task<F, R> {
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn run(self: Box<Self>) {
        let Task { f, reply } = *self;
        // The caller may have gone since: nothing to do then.
        let _ = reply.send(f());
    }
}

/// Runs signatures off the async workers, leaving a core to verifications
/// (see the module doc).
pub(crate) struct SignPool {
    threads: usize,
    epoch: Instant,
    /// When the last verification started, in µs since `epoch` (+1, so 0
    /// means never).
    last_verify: AtomicU64,
    /// The queue and the threads, started on first use.
    shared: OnceLock<Arc<Shared>>,
}

/// What the pool's threads share.
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled on each new job, each finished job and on close.
    ready: Condvar,
    threads: usize,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Box<dyn Job>>,
    /// Jobs running now.
    running: usize,
    closed: bool,
}

impl std::fmt::Debug for SignPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignPool")
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl SignPool {
    /// A pool with one thread per core.
    pub(crate) fn per_core() -> Self {
        Self::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    /// A pool with `threads` threads (at least one).
    pub(crate) fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
            epoch: Instant::now(),
            last_verify: AtomicU64::new(0),
            shared: OnceLock::new(),
        }
    }

    /// Records that a verification starts now: for the next `VERIFYING`,
    /// signatures leave a core free.
    pub(crate) fn verifying(&self) {
        self.last_verify
            .store(self.now_us().saturating_add(1), Ordering::Relaxed);
    }

    /// Microseconds since the pool was made.
    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX - 1)
    }

    /// How many signatures may run at once now.
    fn limit(&self) -> usize {
        self.limit_at(self.now_us())
    }

    /// How many signatures may run at once at `now_us`: one core fewer
    /// than there are threads while a verification started within
    /// `VERIFYING` (but at least one).
    fn limit_at(&self, now_us: u64) -> usize {
        let last = self.last_verify.load(Ordering::Relaxed);
        let recent = last != 0 && now_us.saturating_sub(last - 1) < VERIFYING.as_micros() as u64;
        if recent {
            (self.threads - 1).max(1)
        } else {
            self.threads
        }
    }

    /// Runs `f` on a pool thread and waits for its result without blocking
    /// the async worker. If this future is dropped before a thread takes
    /// the job, `f` never runs.
    pub(crate) async fn run<R, F>(self: &Arc<Self>, f: F) -> Result<R, Refusal>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        self.submit(Box::new(Task { f, reply }))?;
        rx.await.map_err(|_| {
            Refusal::new(
                Reason::Unavailable,
                "no signature: its signing job panicked or the pool closed (see the log)",
            )
        })
    }

    fn submit(self: &Arc<Self>, job: Box<dyn Job>) -> Result<(), Refusal> {
        let shared = self.shared.get_or_init(|| self.start());
        let mut queue = lock(&shared.queue);
        if queue.closed {
            return Err(Refusal::new(
                Reason::Unavailable,
                "the signing pool is closed",
            ));
        }
        if queue.jobs.len() >= MAX_QUEUED {
            return Err(Refusal::new(
                Reason::Unavailable,
                format!("the signing queue is full ({MAX_QUEUED} signatures waiting)"),
            ));
        }
        queue.jobs.push_back(job);
        metrics::gauge!("tokend_signing_queued").set(queue.jobs.len() as f64);
        drop(queue);
        shared.ready.notify_one();
        Ok(())
    }

    fn start(self: &Arc<Self>) -> Arc<Shared> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            threads: self.threads,
        });
        let mut started = 0;
        for i in 0..self.threads {
            let s = Arc::clone(&shared);
            // The thread holds the pool weakly: dropping the last engine
            // drops the pool, which closes the queue and ends the threads.
            let pool = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name(format!("tokend-sign-{i}"))
                .spawn(move || work(&s, &pool));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::error!(error = %e, "could not start a signing thread"),
            }
        }
        if started == 0 {
            // With no thread, jobs would wait forever: refuse them instead.
            lock(&shared.queue).closed = true;
        }
        shared
    }
}

impl Drop for SignPool {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.get() {
            lock(&shared.queue).closed = true;
            shared.ready.notify_all();
        }
    }
}

/// A pool thread: runs jobs until the pool closes and the queue is empty.
fn work(shared: &Shared, pool: &std::sync::Weak<SignPool>) {
    let limit = || pool.upgrade().map_or(shared.threads, |p| p.limit());
    while let Some(job) = next_job(shared, limit) {
        if !job.abandoned() {
            // A panic in one signature must not take the thread (and with
            // it a core's worth of signing) down; the caller sees its
            // reply channel closed and answers `unavailable`.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run())).is_err() {
                tracing::error!("a signing job panicked");
            }
        }
        lock(&shared.queue).running -= 1;
        // A thread held back by the limit may go now.
        shared.ready.notify_one();
    }
}

/// The next job, once fewer than `limit()` run; `None` once closed and
/// empty. The caller must decrement `running` when the job is done.
fn next_job(shared: &Shared, limit: impl Fn() -> usize) -> Option<Box<dyn Job>> {
    let mut queue = lock(&shared.queue);
    loop {
        if queue.jobs.is_empty() {
            if queue.closed {
                return None;
            }
            queue = shared
                .ready
                .wait(queue)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            continue;
        }
        if queue.running < limit() {
            let job = queue.jobs.pop_front();
            queue.running += 1;
            metrics::gauge!("tokend_signing_queued").set(queue.jobs.len() as f64);
            return job;
        }
        // Held back for the verifications: look again when a job ends or
        // when they may have stopped.
        queue = shared
            .ready
            .wait_timeout(queue, VERIFYING)
            .map(|(q, _)| q)
            .unwrap_or_else(|p| p.into_inner().0);
    }
}

/// The queue, even if a thread panicked while holding it (a job never runs
/// under the lock, so the queue itself is always consistent).
fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_jobs_and_returns_their_results() {
        let pool = Arc::new(SignPool::new(2));
        let runs: Vec<_> = (0..20u64)
            .map(|i| {
                let pool = Arc::clone(&pool);
                tokio::spawn(async move { pool.run(move || i * i).await })
            })
            .collect();
        for (i, r) in runs.into_iter().enumerate() {
            let i = i as u64;
            assert_eq!(r.await.expect("task").expect("ran"), i * i);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_answers_unavailable_and_the_pool_lives_on() {
        let pool = Arc::new(SignPool::new(1));
        let r = pool.run(|| -> u32 { panic!("boom") }).await;
        assert_eq!(r.err().map(|e| e.reason), Some(Reason::Unavailable));
        assert_eq!(pool.run(|| 7).await.ok(), Some(7));
    }

    #[test]
    fn while_verifying_one_core_is_left_free_of_signing() {
        let pool = SignPool::new(4);
        assert_eq!(pool.limit(), 4, "no verification yet: every core signs");
        // A verification at 1,000 µs: one core fewer until 5 ms later.
        pool.last_verify.store(1_001, Ordering::Relaxed);
        let window = VERIFYING.as_micros() as u64;
        assert_eq!(pool.limit_at(1_000), 3);
        assert_eq!(pool.limit_at(1_000 + window - 1), 3);
        assert_eq!(pool.limit_at(1_000 + window), 4, "verifications stopped");
        let one = SignPool::new(1);
        one.last_verify.store(1_001, Ordering::Relaxed);
        assert_eq!(one.limit_at(1_000), 1, "a single core still signs");
        // `verifying` records now: one core fewer from that instant.
        pool.verifying();
        let at = pool.last_verify.load(Ordering::Relaxed) - 1;
        assert!(at <= pool.now_us());
        assert_eq!(pool.limit_at(at), 3);
    }

    #[test]
    fn the_limit_holds_jobs_back_until_one_ends() {
        let shared = Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            threads: 2,
        };
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..2 {
            let (reply, _rx) = oneshot::channel::<()>();
            let ran = Arc::clone(&ran);
            lock(&shared.queue).jobs.push_back(Box::new(Task {
                f: move || {
                    ran.fetch_add(1, Ordering::SeqCst);
                },
                reply,
            }));
        }
        let first = next_job(&shared, || 1).expect("a job");
        assert_eq!(lock(&shared.queue).running, 1);
        // With one running and a limit of one, the second waits; a thread
        // that finishes the first lets it go.
        std::thread::scope(|s| {
            let waiter = s.spawn(|| next_job(&shared, || 1).is_some());
            std::thread::sleep(Duration::from_millis(20));
            assert!(!waiter.is_finished(), "held back by the limit");
            lock(&shared.queue).running -= 1;
            shared.ready.notify_one();
            assert!(waiter.join().expect("waiter"));
        });
        drop(first);
    }

    /// Occupies a thread of `pool` until the returned sender sends (or is
    /// dropped); the handle ends when that job did.
    async fn hold(
        pool: &Arc<SignPool>,
    ) -> (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<(), Refusal>>,
    ) {
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let busy = {
            let pool = Arc::clone(pool);
            tokio::spawn(async move {
                pool.run(move || {
                    let _ = hold_rx.recv();
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        (hold_tx, busy)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_whose_caller_left_never_runs() {
        let pool = Arc::new(SignPool::new(1));
        let ran = Arc::new(AtomicUsize::new(0));
        // Hold the one thread, queue a job, and drop its caller.
        let (hold_tx, busy) = hold(&pool).await;
        let left = {
            let pool = Arc::clone(&pool);
            let ran = Arc::clone(&ran);
            tokio::spawn(async move {
                pool.run(move || {
                    ran.fetch_add(1, Ordering::SeqCst);
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        left.abort();
        let _ = left.await;
        hold_tx.send(()).expect("release");
        busy.await.expect("task").expect("ran");
        // A later job runs, so the abandoned one was taken and skipped.
        assert_eq!(pool.run(|| 1).await.ok(), Some(1));
        assert_eq!(ran.load(Ordering::SeqCst), 0, "the abandoned job never ran");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_unavailable() {
        let pool = Arc::new(SignPool::new(1));
        let (hold_tx, busy) = hold(&pool).await;
        let shared = pool.shared.get().expect("started");
        for _ in 0..MAX_QUEUED {
            let (reply, rx) = oneshot::channel::<()>();
            std::mem::forget(rx);
            lock(&shared.queue)
                .jobs
                .push_back(Box::new(Task { f: || (), reply }));
        }
        let r = pool.run(|| ()).await;
        assert_eq!(r.err().map(|e| e.reason), Some(Reason::Unavailable));
        hold_tx.send(()).expect("release");
        busy.await.expect("task").expect("ran");
    }

    #[test]
    fn a_dropped_pool_closes_its_queue_and_its_threads_end() {
        let pool = Arc::new(SignPool::new(1));
        let shared = pool.shared.get_or_init(|| pool.start()).clone();
        drop(pool);
        assert!(lock(&shared.queue).closed);
        assert!(next_job(&shared, || 1).is_none());
    }
}
