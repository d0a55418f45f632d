//! The signing pool. An RSA signature costs ~0.5 ms of CPU at 2048 bits and
//! several ms at 4096; run on the async workers, or on threads of the same
//! priority, a burst of uncached mints holds every core and each verify
//! that arrives meanwhile waits behind a whole signature. So signatures
//! run here: one thread per core under Linux's `SCHED_IDLE` policy, which
//! the kernel preempts at once whenever a normal thread (an async worker
//! with a verify to answer) becomes runnable, and which gets every cycle
//! the workers leave idle, so mint throughput alone is unchanged.
//!
//! An idle-policy thread gets almost no CPU while normal threads keep every
//! core busy (a verify overload, or other programs on the host), and an
//! unprivileged thread cannot leave that policy again. So as many threads
//! again stay at normal priority and sign only jobs that have waited
//! `STARVED` or longer: when the CPU is saturated, mints get their fair
//! share, as they would without the pool, after at most `STARVED` more.
//!
//! Threads start on the first job and end when the pool is dropped.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::reason::{Reason, Refusal};

/// How long a job may wait for an idle-priority thread before the
/// normal-priority thread takes it.
pub(crate) const STARVED: Duration = Duration::from_millis(10);

/// A signature to compute, with its reply channel inside.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// Runs signatures off the async workers, at a priority that never delays
/// them (see the module doc).
pub(crate) struct SignPool {
    /// Idle-priority threads (one per core), and as many rescuers.
    threads: usize,
    /// The queue and the threads, started on first use.
    shared: OnceLock<Arc<Shared>>,
}

/// What the pool's threads share.
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled on each new job and on close.
    ready: Condvar,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<(Instant, Job)>,
    closed: bool,
}

/// Which kind of pool thread is asking for work.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    /// Takes any job, the oldest first; runs at idle priority.
    Idle,
    /// Takes only jobs that waited `STARVED`; runs at normal priority.
    Rescue,
}

impl std::fmt::Debug for SignPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignPool")
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl SignPool {
    /// A pool with one idle-priority thread per core (and as many rescuers).
    pub(crate) fn per_core() -> Self {
        Self::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    /// A pool with `threads` idle-priority threads and `threads` rescuers
    /// (at least one of each).
    pub(crate) fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
            shared: OnceLock::new(),
        }
    }

    /// Runs `f` on a pool thread and waits for its result without blocking
    /// the async worker.
    pub(crate) async fn run<R, F>(&self, f: F) -> Result<R, Refusal>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            // The caller may have gone (a cancelled request): nothing to do.
            let _ = tx.send(f());
        });
        self.submit(job)?;
        rx.await
            .map_err(|_| Refusal::new(Reason::Unavailable, "the signing task failed"))
    }

    fn submit(&self, job: Job) -> Result<(), Refusal> {
        let shared = self.shared.get_or_init(|| self.start());
        let mut queue = lock(&shared.queue);
        if queue.closed {
            return Err(Refusal::new(
                Reason::Unavailable,
                "the signing pool is closed",
            ));
        }
        queue.jobs.push_back((Instant::now(), job));
        drop(queue);
        shared.ready.notify_all();
        Ok(())
    }

    fn start(&self) -> Arc<Shared> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
        });
        let roles = std::iter::repeat_n(Role::Idle, self.threads)
            .chain(std::iter::repeat_n(Role::Rescue, self.threads));
        for (i, role) in roles.enumerate() {
            let s = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("tokend-sign-{i}"))
                .spawn(move || work(&s, role));
            if let Err(e) = spawned {
                // Fewer threads only means slower mints; with none at all,
                // jobs would wait forever, so the next submit fails instead.
                tracing::error!(error = %e, "could not start a signing thread");
                if i == 0 {
                    lock(&shared.queue).closed = true;
                }
            }
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

/// A pool thread: lowers its own priority (idle role), then runs jobs
/// until the pool closes and the queue is empty.
fn work(shared: &Shared, role: Role) {
    if role == Role::Idle {
        lower_priority();
    }
    while let Some(job) = next_job(shared, role) {
        // A panic in one signature must not take the thread (and with it
        // a core's worth of signing) down; the caller sees its reply
        // channel closed and answers `unavailable`.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
            tracing::error!("a signing job panicked");
        }
    }
}

/// The next job for `role`, waiting as long as needed; `None` once closed.
fn next_job(shared: &Shared, role: Role) -> Option<Job> {
    let mut queue = lock(&shared.queue);
    loop {
        match role {
            Role::Idle => {
                if let Some((_, job)) = queue.jobs.pop_front() {
                    return Some(job);
                }
                if queue.closed {
                    return None;
                }
                queue = shared
                    .ready
                    .wait(queue)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            Role::Rescue => {
                let waited = queue.jobs.front().map(|(at, _)| at.elapsed());
                match waited {
                    Some(w) if w >= STARVED => return queue.jobs.pop_front().map(|(_, j)| j),
                    None if queue.closed => return None,
                    _ => {}
                }
                queue = match waited {
                    // Look again when the oldest job would have starved.
                    Some(w) => shared
                        .ready
                        .wait_timeout(
                            queue,
                            STARVED.saturating_sub(w).max(Duration::from_millis(1)),
                        )
                        .map(|(q, _)| q)
                        .unwrap_or_else(|p| p.into_inner().0),
                    // Nothing queued: sleep until a job (or the close) comes.
                    None => shared
                        .ready
                        .wait(queue)
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                };
            }
        }
    }
}

/// Puts the calling thread under `SCHED_IDLE` (Linux). Elsewhere, or where
/// the kernel refuses, the thread stays at normal priority: signing still
/// works, only the tail of concurrent verifies is longer.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::unix::{
            NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
            thread_native_id,
        };
        let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
        if let Err(e) = set_thread_priority_and_policy(
            thread_native_id(),
            thread_priority::ThreadPriority::Min,
            idle,
        ) {
            tracing::debug!(error = ?e, "signing thread stays at normal priority");
        }
    }
}

/// The queue, even if a thread panicked while holding it (a job never runs
/// under the lock, so the queue itself is always consistent).
fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_jobs_and_returns_their_results() {
        let pool = SignPool::new(2);
        let results = futures_join(&pool, 20).await;
        assert_eq!(results, (0..20).map(|i| i * i).collect::<Vec<_>>());
    }

    async fn futures_join(pool: &SignPool, n: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for i in 0..n {
            out.push(pool.run(move || i * i).await.expect("ran"));
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_answers_unavailable_and_the_pool_lives_on() {
        let pool = SignPool::new(1);
        let r = pool.run(|| -> u32 { panic!("boom") }).await;
        assert_eq!(r.err().map(|e| e.reason), Some(Reason::Unavailable));
        assert_eq!(pool.run(|| 7).await.ok(), Some(7));
    }

    #[test]
    fn the_rescuer_takes_only_starved_jobs() {
        let shared = Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
        };
        let old = Instant::now()
            .checked_sub(STARVED * 2)
            .expect("the clock is past STARVED");
        lock(&shared.queue).jobs.push_back((old, Box::new(|| ())));
        assert!(next_job(&shared, Role::Rescue).is_some());
        lock(&shared.queue)
            .jobs
            .push_back((Instant::now(), Box::new(|| ())));
        lock(&shared.queue).closed = true;
        // A fresh job is not the rescuer's, until it has waited STARVED;
        // then it is taken, and then the closed, empty queue ends it.
        assert!(next_job(&shared, Role::Rescue).is_some());
        assert!(next_job(&shared, Role::Rescue).is_none());
    }

    #[test]
    fn a_dropped_pool_closes_its_queue_and_its_threads_end() {
        let pool = SignPool::new(1);
        let shared = pool.shared.get_or_init(|| pool.start()).clone();
        drop(pool);
        assert!(lock(&shared.queue).closed);
        assert!(next_job(&shared, Role::Idle).is_none());
    }
}
