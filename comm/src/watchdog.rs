//! A watchdog for asynchronous collectives: deadlines, polling, and what happens on a timeout
//! or an asynchronous error. PyTorch's `ProcessGroupNCCL` watchdog is the model.
//!
//! NCCL collectives are enqueued on a CUDA stream and return at once; a collective whose peer
//! never arrives (a dead or desynchronised rank) or whose transport failed does not return an
//! error, it leaves the GPU waiting forever, and the host blocks at its next synchronisation
//! (a copy to the host) with nothing to say why. So every enqueued collective leaves a
//! completion marker (a CUDA event recorded after it) with the watchdog, and a background
//! thread polls, every `poll` interval:
//! 1. the communicator's asynchronous error (`ncclCommGetAsyncError`),
//! 2. the markers, oldest first, releasing the completed ones,
//! 3. the oldest pending one's age against the timeout (`parallel.timeout_s`).
//!
//! On an error or a timeout it records a [`Failure`] naming the collective, the rank and the
//! timeout, prints it (the host thread may be blocked where it cannot), and aborts the
//! communicator (`ncclCommAbort`), which ends the in-flight kernels and so unblocks the host.
//! The communicator's next call returns the failure ([`Watchdog::check`]). If nobody takes it
//! within `grace` (the host is stuck where abort did not reach), the watchdog ends the
//! process ([`Watched::terminate`]), as PyTorch does with `TORCH_NCCL_ASYNC_ERROR_HANDLING=1`:
//! under mpirun that ends the job instead of leaving it hung.
//!
//! The logic is generic over [`Watched`], so it is tested on the CPU with fake work items.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What the watchdog watches: a communicator and the completion markers of its collectives.
///
/// Every method is called from the watchdog thread, so none may block for long.
pub trait Watched: Send + Sync + 'static {
    /// The completion marker of one enqueued collective (a CUDA event).
    type Work: Send + 'static;
    /// Whether the collective behind `work` has completed; `Err` when that cannot be
    /// queried (a CUDA error, which dooms the communicator too).
    fn is_done(&self, work: &Self::Work) -> Result<bool, String>;
    /// Releases the marker of a completed collective.
    fn release(&self, work: Self::Work);
    /// The communicator's asynchronous error, if one happened (a failed transport, a peer
    /// that went away).
    fn async_error(&self) -> Option<String>;
    /// Aborts the communicator: in-flight collectives end, later calls fail. Called at most
    /// once per failure, and never after the owner stopped the watchdog.
    fn abort(&self);
    /// Ends the process after `failure` was left unclaimed for the grace period.
    fn terminate(&self, failure: &Failure);
}

/// Why the watchdog gave up on a communicator.
#[derive(Debug, Clone, PartialEq)]
pub enum FailureKind {
    /// The oldest collective did not complete within the timeout.
    Timeout { elapsed: Duration },
    /// The communicator reported an asynchronous error.
    AsyncError(String),
    /// A completion marker could not be queried.
    QueryError(String),
}

/// A failed communicator: what failed, on which rank, and under which timeout.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// Backend, for the message ("nccl").
    pub backend: &'static str,
    /// The collective in flight when it failed (the oldest pending one), if any.
    pub op: Option<&'static str>,
    /// This rank's index in the communicator, and the communicator's size.
    pub rank: usize,
    pub size: usize,
    /// The timeout in force.
    pub timeout: Duration,
    pub kind: FailureKind,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = format!("rank {} of {}", self.rank, self.size);
        let op = self.op.unwrap_or("no collective in flight");
        let t = self.timeout.as_secs_f64();
        match &self.kind {
            FailureKind::Timeout { elapsed } => write!(
                f,
                "{} collective {op} on {who} did not complete within parallel.timeout_s ({t} s), \
                 waited {:.1} s: a peer rank is dead, stuck or running different collectives; \
                 the communicator was aborted",
                self.backend,
                elapsed.as_secs_f64()
            ),
            FailureKind::AsyncError(e) => write!(
                f,
                "{} asynchronous error on {who} during {op}: {e} (parallel.timeout_s {t} s); \
                 the communicator was aborted",
                self.backend
            ),
            FailureKind::QueryError(e) => write!(
                f,
                "{} collective {op} on {who}: its completion could not be checked: {e} \
                 (parallel.timeout_s {t} s); the communicator was aborted",
                self.backend
            ),
        }
    }
}

/// How often to poll, how long a collective may take, and how long a failure may stay
/// unclaimed before the process ends.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub poll: Duration,
    pub grace: Duration,
}

impl Limits {
    /// `timeout` with a poll of a tenth of it (between 10 ms and 1 s) and a grace period
    /// of the timeout itself (at least 10 s).
    pub fn for_timeout(timeout: Duration) -> Self {
        Limits {
            timeout,
            poll: (timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1)),
            grace: timeout.max(Duration::from_secs(10)),
        }
    }
}

struct Pending<W> {
    op: &'static str,
    started: Instant,
    work: W,
}

struct State<W> {
    queue: VecDeque<Pending<W>>,
    failure: Option<(Failure, Instant)>,
    claimed: bool,
    terminated: bool,
    stopped: bool,
}

struct Core<T: Watched> {
    target: T,
    backend: &'static str,
    rank: usize,
    size: usize,
    limits: Limits,
    state: Mutex<State<T::Work>>,
    wake: Condvar,
}

/// What one poll did.
#[derive(Debug, Clone, PartialEq)]
pub enum Tick {
    /// Nothing pending, or everything pending is within its deadline.
    Healthy,
    /// A new failure: recorded and the communicator aborted.
    Failed(Failure),
    /// A failure left unclaimed past the grace period: the process was ended.
    Terminated,
    /// The owner stopped the watchdog.
    Stopped,
}

impl<T: Watched> Core<T> {
    fn lock(&self) -> MutexGuard<'_, State<T::Work>> {
        // A panic while holding this lock can only come from `Watched` methods; the state
        // itself stays consistent, so keep going rather than propagate the poison.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failure(&self, op: Option<&'static str>, kind: FailureKind) -> Failure {
        Failure {
            backend: self.backend,
            op,
            rank: self.rank,
            size: self.size,
            timeout: self.limits.timeout,
            kind,
        }
    }

    /// One poll at time `now`: the whole decision logic, without sleeping.
    fn tick(&self, now: Instant) -> Tick {
        let mut st = self.lock();
        if st.stopped {
            return Tick::Stopped;
        }
        if let Some((_, at)) = &st.failure {
            if !st.claimed && !st.terminated && now.duration_since(*at) >= self.limits.grace {
                st.terminated = true;
                let f = st.failure.as_ref().map(|(f, _)| f.clone());
                drop(st);
                if let Some(f) = f {
                    self.target.terminate(&f);
                }
                return Tick::Terminated;
            }
            return Tick::Healthy;
        }
        let oldest = st.queue.front().map(|p| p.op);
        let mut failed = self
            .target
            .async_error()
            .map(|e| self.failure(oldest, FailureKind::AsyncError(e)));
        while failed.is_none() {
            let Some(front) = st.queue.front() else { break };
            match self.target.is_done(&front.work) {
                Ok(true) => {
                    if let Some(p) = st.queue.pop_front() {
                        self.target.release(p.work);
                    }
                }
                Ok(false) => {
                    let elapsed = now.saturating_duration_since(front.started);
                    if elapsed > self.limits.timeout {
                        failed =
                            Some(self.failure(Some(front.op), FailureKind::Timeout { elapsed }));
                    }
                    break;
                }
                Err(e) => failed = Some(self.failure(Some(front.op), FailureKind::QueryError(e))),
            }
        }
        let Some(f) = failed else {
            return Tick::Healthy;
        };
        st.failure = Some((f.clone(), now));
        drop(st);
        // Printed here as well as returned by `check`: the host thread may be blocked in a
        // CUDA synchronisation that only the abort below can end.
        eprintln!("error: {f}");
        self.target.abort();
        Tick::Failed(f)
    }
}

/// The watchdog of one communicator: owns its polling thread.
pub struct Watchdog<T: Watched> {
    core: Arc<Core<T>>,
}

impl<T: Watched> Watchdog<T> {
    /// Starts watching `target` (`rank` of `size`, for messages) on a background thread.
    pub fn spawn(
        target: T,
        backend: &'static str,
        rank: usize,
        size: usize,
        limits: Limits,
    ) -> std::io::Result<Self> {
        let wd = Self::new(target, backend, rank, size, limits);
        let core = wd.core.clone();
        std::thread::Builder::new()
            .name(format!("{backend}-watchdog-r{rank}"))
            .spawn(move || loop {
                if matches!(core.tick(Instant::now()), Tick::Stopped | Tick::Terminated) {
                    return;
                }
                let st = core.lock();
                if st.stopped {
                    return;
                }
                // Woken early by `stop`; otherwise poll again after `poll`.
                let _ = core.wake.wait_timeout(st, core.limits.poll);
            })?;
        Ok(wd)
    }

    /// A watchdog without a thread: [`Watchdog::tick`] drives it (tests).
    pub fn new(target: T, backend: &'static str, rank: usize, size: usize, limits: Limits) -> Self {
        Watchdog {
            core: Arc::new(Core {
                target,
                backend,
                rank,
                size,
                limits,
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    failure: None,
                    claimed: false,
                    terminated: false,
                    stopped: false,
                }),
                wake: Condvar::new(),
            }),
        }
    }

    /// The watched communicator.
    pub fn target(&self) -> &T {
        &self.core.target
    }

    /// One poll at `now` (what the thread does every `poll`).
    pub fn tick(&self, now: Instant) -> Tick {
        self.core.tick(now)
    }

    /// Hands over the completion marker of collective `op`, enqueued at `started`.
    pub fn watch(&self, op: &'static str, started: Instant, work: T::Work) {
        let mut st = self.core.lock();
        if st.failure.is_some() || st.stopped {
            // Nothing will wait for it: the communicator is already given up.
            drop(st);
            self.core.target.release(work);
            return;
        }
        st.queue.push_back(Pending { op, started, work });
    }

    /// The failure, if the communicator failed; claiming it stops the grace-period
    /// termination (the owner now reports the error itself).
    pub fn check(&self) -> Result<(), Failure> {
        let mut st = self.core.lock();
        match &st.failure {
            Some((f, _)) => {
                let f = f.clone();
                st.claimed = true;
                Err(f)
            }
            None => Ok(()),
        }
    }

    /// Collectives enqueued and not yet seen complete.
    pub fn pending(&self) -> usize {
        self.core.lock().queue.len()
    }

    /// Stops the thread without waiting for it, after a last non-blocking poll. Returns
    /// whether the communicator is clean (nothing pending, no failure): only then may its
    /// owner destroy it gracefully; otherwise it must be aborted.
    pub fn stop(&self) -> bool {
        // The owner is going away and aborts on failure itself: no termination from here.
        self.core.lock().claimed = true;
        let tick = self.core.tick(Instant::now());
        let mut st = self.core.lock();
        st.stopped = true;
        self.core.wake.notify_all();
        let clean = st.failure.is_none() && st.queue.is_empty() && tick == Tick::Healthy;
        // Markers of collectives that may never complete are leaked, not released: the
        // communicator is about to be aborted.
        if clean {
            st.queue.clear();
        }
        clean
    }
}

impl<T: Watched> Drop for Watchdog<T> {
    fn drop(&mut self) {
        let mut st = self.core.lock();
        st.stopped = true;
        self.core.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A fake communicator: work items are ids, done when listed in `done`.
    #[derive(Default)]
    struct Fake {
        done: Mutex<Vec<u32>>,
        released: Mutex<Vec<u32>>,
        async_error: Mutex<Option<String>>,
        query_error: AtomicBool,
        aborts: AtomicUsize,
        terminations: AtomicUsize,
    }

    impl Watched for Arc<Fake> {
        type Work = u32;
        fn is_done(&self, w: &u32) -> Result<bool, String> {
            if self.query_error.load(Ordering::SeqCst) {
                return Err("cudaErrorLaunchFailure".into());
            }
            Ok(self.done.lock().unwrap().contains(w))
        }
        fn release(&self, w: u32) {
            self.released.lock().unwrap().push(w);
        }
        fn async_error(&self) -> Option<String> {
            self.async_error.lock().unwrap().clone()
        }
        fn abort(&self) {
            self.aborts.fetch_add(1, Ordering::SeqCst);
        }
        fn terminate(&self, _: &Failure) {
            self.terminations.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn limits(timeout_ms: u64) -> Limits {
        Limits {
            timeout: Duration::from_millis(timeout_ms),
            poll: Duration::from_millis(5),
            grace: Duration::from_millis(4 * timeout_ms),
        }
    }

    fn setup(timeout_ms: u64) -> (Arc<Fake>, Watchdog<Arc<Fake>>) {
        let fake = Arc::new(Fake::default());
        let wd = Watchdog::new(fake.clone(), "nccl", 1, 4, limits(timeout_ms));
        (fake, wd)
    }

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn completed_work_is_released_in_order_and_nothing_fails() {
        let (fake, wd) = setup(100);
        let t0 = Instant::now();
        wd.watch("all_to_all", t0, 1);
        wd.watch("all_reduce_sum", t0, 2);
        fake.done.lock().unwrap().push(2);
        // 2 is done but 1 is not: in-order release keeps both.
        assert_eq!(wd.tick(ms(t0, 50)), Tick::Healthy);
        assert_eq!(wd.pending(), 2);
        fake.done.lock().unwrap().push(1);
        // Long past the timeout, but both completed: no failure.
        assert_eq!(wd.tick(ms(t0, 500)), Tick::Healthy);
        assert_eq!(wd.pending(), 0);
        assert_eq!(*fake.released.lock().unwrap(), vec![1, 2]);
        assert_eq!(wd.check(), Ok(()));
        assert_eq!(fake.aborts.load(Ordering::SeqCst), 0);
        assert!(wd.stop(), "a clean communicator may be destroyed");
    }

    #[test]
    fn a_stuck_collective_times_out_aborts_and_names_op_rank_and_timeout() {
        let (fake, wd) = setup(100);
        let t0 = Instant::now();
        wd.watch("all_reduce_sum", t0, 1);
        wd.watch("all_to_all", ms(t0, 10), 2);
        fake.done.lock().unwrap().push(1);
        // Exactly at the deadline of the oldest pending one (2, started at 10 ms): not yet.
        assert_eq!(wd.tick(ms(t0, 110)), Tick::Healthy);
        assert_eq!(fake.aborts.load(Ordering::SeqCst), 0);
        let Tick::Failed(f) = wd.tick(ms(t0, 111)) else {
            panic!("expected a timeout")
        };
        assert_eq!(f.op, Some("all_to_all"));
        assert_eq!(
            f.kind,
            FailureKind::Timeout {
                elapsed: Duration::from_millis(101)
            }
        );
        let msg = f.to_string();
        for want in [
            "all_to_all",
            "rank 1 of 4",
            "parallel.timeout_s (0.1 s)",
            "aborted",
        ] {
            assert!(msg.contains(want), "{want:?} missing from: {msg}");
        }
        assert_eq!(fake.aborts.load(Ordering::SeqCst), 1);
        // The owner's next call gets the failure; later polls do not abort again.
        assert_eq!(wd.check(), Err(f));
        assert_eq!(wd.tick(ms(t0, 10_000)), Tick::Healthy);
        assert_eq!(fake.aborts.load(Ordering::SeqCst), 1);
        assert_eq!(fake.terminations.load(Ordering::SeqCst), 0, "claimed");
        assert!(
            !wd.stop(),
            "a failed communicator must be aborted, not destroyed"
        );
    }

    #[test]
    fn an_async_error_aborts_at_once_naming_the_collective() {
        let (fake, wd) = setup(60_000);
        let t0 = Instant::now();
        wd.watch("broadcast", t0, 7);
        assert_eq!(wd.tick(ms(t0, 1)), Tick::Healthy);
        *fake.async_error.lock().unwrap() = Some("remote process exited (ncclRemoteError)".into());
        let Tick::Failed(f) = wd.tick(ms(t0, 2)) else {
            panic!("expected the async error")
        };
        assert_eq!(f.op, Some("broadcast"));
        let msg = f.to_string();
        assert!(
            msg.contains("ncclRemoteError") && msg.contains("rank 1 of 4"),
            "{msg}"
        );
        assert!(msg.contains("60 s"), "{msg}");
        assert_eq!(fake.aborts.load(Ordering::SeqCst), 1);
        assert!(wd.check().is_err());
    }

    #[test]
    fn a_query_error_fails_the_communicator() {
        let (fake, wd) = setup(1000);
        let t0 = Instant::now();
        wd.watch("all_gather", t0, 3);
        fake.query_error.store(true, Ordering::SeqCst);
        let Tick::Failed(f) = wd.tick(ms(t0, 1)) else {
            panic!("expected a failure")
        };
        assert!(matches!(f.kind, FailureKind::QueryError(ref e) if e.contains("cudaError")));
        assert_eq!(fake.aborts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_unclaimed_failure_ends_the_process_after_the_grace_period() {
        let (fake, wd) = setup(100);
        let t0 = Instant::now();
        wd.watch("all_to_all", t0, 1);
        assert!(matches!(wd.tick(ms(t0, 200)), Tick::Failed(_)));
        // grace is 400 ms after the failure (at 200 ms).
        assert_eq!(wd.tick(ms(t0, 599)), Tick::Healthy);
        assert_eq!(fake.terminations.load(Ordering::SeqCst), 0);
        assert_eq!(wd.tick(ms(t0, 600)), Tick::Terminated);
        assert_eq!(fake.terminations.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn stop_with_pending_work_reports_unclean_and_watch_after_failure_releases() {
        let (fake, wd) = setup(1000);
        let t0 = Instant::now();
        wd.watch("all_to_all", t0, 1);
        assert!(!wd.stop(), "pending work: the owner must abort");
        assert_eq!(wd.tick(ms(t0, 5000)), Tick::Stopped);
        assert_eq!(
            fake.aborts.load(Ordering::SeqCst),
            0,
            "the owner aborts, not the watchdog"
        );
        wd.watch("barrier", t0, 9);
        assert_eq!(*fake.released.lock().unwrap(), vec![9]);
    }

    #[test]
    fn limits_follow_the_timeout() {
        let l = Limits::for_timeout(Duration::from_secs(60));
        assert_eq!(
            (l.poll, l.grace),
            (Duration::from_secs(1), Duration::from_secs(60))
        );
        let l = Limits::for_timeout(Duration::from_millis(50));
        assert_eq!(
            (l.poll, l.grace),
            (Duration::from_millis(10), Duration::from_secs(10))
        );
    }

    /// The real thread, real clock: a stuck collective is aborted within a few polls of its
    /// deadline, and one that completes in time is not.
    #[test]
    fn the_thread_enforces_the_timeout() {
        let fake = Arc::new(Fake::default());
        let wd = Watchdog::spawn(fake.clone(), "nccl", 0, 2, limits(50)).unwrap();
        wd.watch("all_reduce_sum", Instant::now(), 1);
        fake.done.lock().unwrap().push(1);
        wd.watch("all_to_all", Instant::now(), 2);
        let t0 = Instant::now();
        while wd.check().is_ok() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the watchdog never fired"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let f = wd.check().unwrap_err();
        assert_eq!(f.op, Some("all_to_all"));
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert_eq!(fake.aborts.load(Ordering::SeqCst), 1);
        assert_eq!(*fake.released.lock().unwrap(), vec![1]);
    }
}
