//! A small fork-join thread pool tuned for the forward pass.
//!
//! A decode step of a small model issues a few hundred parallel kernels of a few microseconds
//! each, so waking threads through the OS on every kernel would cost more than the work
//! (rayon's per-call overhead is in that range). Like ggml's CPU backend, workers spin on a
//! generation counter for a short while after each job and only then sleep on a condvar.
//! The calling thread takes part as thread 0, so `ThreadPool::new(1)` runs everything inline.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN_FOR: Duration = Duration::from_micros(200);

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    n_threads: usize,
    /// Bumped once per job; workers run the job when they see it change.
    generation: AtomicUsize,
    /// Workers (not the caller) still running the current job.
    remaining: AtomicUsize,
    /// The current job, valid while `remaining > 0` for the current generation.
    job: Mutex<Option<JobPtr>>,
    sleeping: AtomicUsize,
    /// Set by [`ThreadPool::park`]: idle workers sleep at once instead of spinning.
    parked: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicUsize,
}

#[derive(Clone, Copy)]
struct JobPtr(*const Job);
// SAFETY: the pointee is `Sync` and `run` keeps it alive until every worker is done with it.
unsafe impl Send for JobPtr {}

/// Fork-join pool: `run(f)` calls `f(ith, nth)` once on each of `nth` threads.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes `run` calls from different threads.
    busy: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool").field("n_threads", &self.shared.n_threads).finish()
    }
}

impl ThreadPool {
    /// Creates a pool of `n_threads` threads, the caller included (so `n_threads - 1` are
    /// spawned). Zero is treated as one.
    pub fn new(n_threads: usize) -> Self {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            n_threads,
            generation: AtomicUsize::new(0),
            remaining: AtomicUsize::new(0),
            job: Mutex::new(None),
            sleeping: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicUsize::new(0),
        });
        let workers = (1..n_threads)
            .map(|ith| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("shoal-compute-{ith}"))
                    .spawn(move || worker_loop(&shared, ith))
                    .expect("spawning a compute thread")
            })
            .collect();
        ThreadPool { shared, workers, busy: Mutex::new(()) }
    }

    /// Number of threads, the caller included.
    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Tells the idle workers to sleep now rather than spin for the next job. A process that
    /// shares its cores with others (pipeline stages on one host) calls this when it has
    /// finished a step, so its spinning threads do not steal the next stage's cores; the next
    /// [`ThreadPool::run`] wakes them.
    pub fn park(&self) {
        self.shared.parked.store(true, Ordering::Release);
    }

    /// Runs `f(ith, nth)` on every thread of the pool (the caller is `ith == 0`) and returns
    /// when all calls have returned. A panic in a worker aborts the process, since the job
    /// borrows the caller's stack.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, f: F) {
        let nth = self.shared.n_threads;
        if nth == 1 {
            f(0, 1);
            return;
        }
        let _guard = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let job: &(dyn Fn(usize, usize) + Sync + '_) = &f;
        // SAFETY: the lifetime is erased only for as long as this function waits for every
        // worker to finish with the job below.
        let job: &'static Job = unsafe {
            std::mem::transmute::<&(dyn Fn(usize, usize) + Sync + '_), &'static Job>(job)
        };
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(JobPtr(job));
        self.shared.parked.store(false, Ordering::Release);
        self.shared.remaining.store(nth - 1, Ordering::Release);
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        if self.shared.sleeping.load(Ordering::Acquire) > 0 {
            let _l = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        f(0, nth);
        let mut spins = 0u32;
        while self.shared.remaining.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn worker_loop(shared: &Shared, ith: usize) {
    let mut seen = 0usize;
    loop {
        // Wait for a new generation: spin first, then sleep.
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if shared.shutdown.load(Ordering::Acquire) != 0 {
                return;
            }
            let g = shared.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256)
                && (start.elapsed() > SPIN_FOR || shared.parked.load(Ordering::Acquire))
            {
                let guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
                shared.sleeping.fetch_add(1, Ordering::AcqRel);
                let g = shared.generation.load(Ordering::Acquire);
                if g == seen && shared.shutdown.load(Ordering::Acquire) == 0 {
                    let _g = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                shared.sleeping.fetch_sub(1, Ordering::AcqRel);
            } else {
                std::hint::spin_loop();
            }
        }
        let job = *shared.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(JobPtr(job)) = job {
            // SAFETY: `run` keeps the job alive until `remaining` drops to zero.
            let job = unsafe { &*job };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                job(ith, shared.n_threads)
            }));
            if r.is_err() {
                eprintln!("shoal: a compute thread panicked; aborting");
                std::process::abort();
            }
        }
        shared.remaining.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(1, Ordering::Release);
        {
            let _l = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Splits `0..n` into `nth` nearly equal contiguous parts and returns part `ith`.
pub fn split_range(n: usize, ith: usize, nth: usize) -> std::ops::Range<usize> {
    let per = n.div_ceil(nth.max(1));
    let start = (ith * per).min(n);
    let end = (start + per).min(n);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_thread_runs_once_per_job() {
        for n in [1, 2, 3, 5] {
            let pool = ThreadPool::new(n);
            for _ in 0..200 {
                let hits = AtomicU64::new(0);
                pool.run(|ith, nth| {
                    assert_eq!(nth, n);
                    hits.fetch_add(1 << (ith * 8), Ordering::Relaxed);
                });
                let want: u64 = (0..n).map(|i| 1u64 << (i * 8)).sum();
                assert_eq!(hits.load(Ordering::Relaxed), want);
            }
        }
    }

    #[test]
    fn workers_wake_after_sleeping() {
        let pool = ThreadPool::new(3);
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(5));
            let sum = AtomicU64::new(0);
            pool.run(|ith, _| {
                sum.fetch_add(ith as u64 + 1, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 6);
        }
    }

    #[test]
    fn split_range_covers_everything_once() {
        for n in [0, 1, 7, 64, 100] {
            for nth in 1..6 {
                let mut seen = vec![0u8; n];
                for ith in 0..nth {
                    for i in split_range(n, ith, nth) {
                        seen[i] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "n={n} nth={nth}");
            }
        }
    }
}
