//! A persistent thread pool that is cheap per op: a token runs hundreds of ops, so
//! workers spin briefly on an epoch counter between jobs and park only when idle.
//!
//! One job runs at a time (`run` holds a lock): the calling thread takes part as
//! worker 0, so a pool of `n` threads spawns `n - 1`.
//!
//! Workers *join* a job; when the caller has finished its own part it closes the job
//! and waits only for the workers that joined. A worker that is descheduled (the 2
//! vCPUs of a small VM are often shared with other processes), parked or slow to wake
//! is not waited for: the caller, which takes work from the same dynamic chunk
//! counter, simply does its share. Jobs must therefore not depend on every thread
//! running; the thread index is only a hint.
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(100);

type Job = dyn Fn(usize) + Sync;

/// `Shared::state`: the job's epoch in the high 32 bits, [`CLOSED`], and the number of
/// workers that joined in the low bits.
const CLOSED: u64 = 1 << 31;
const JOINED: u64 = CLOSED - 1;

struct Shared {
    /// Epoch (bumped once per job; workers wait for it to change), closed flag and
    /// joined count; see [`CLOSED`].
    state: AtomicU64,
    /// The current job, valid while `run` waits for it (lifetime erased).
    job: UnsafeCell<Option<*const Job>>,
    /// Joined workers that finished the current job.
    done: AtomicU64,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by `run` while no worker reads it (between jobs, every
// worker that joined has reported done, and no other can join a closed job), and read
// by workers only after they joined the new epoch (Acquire CAS), which `run` publishes
// after the write (Release).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A fixed set of worker threads.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    run_lock: Mutex<()>,
    n: usize,
}

impl Pool {
    /// A pool of `n` threads in all (the caller counts as one).
    pub fn new(n: usize) -> Pool {
        let n = n.max(1);
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            done: AtomicU64::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..n)
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("samepage-cpu-{i}"))
                    .spawn(move || worker(&s, i))
                    .expect("spawn a samepage CPU worker thread")
            })
            .collect();
        Pool {
            shared,
            workers,
            run_lock: Mutex::new(()),
            n,
        }
    }

    /// The number of threads, the caller included.
    pub fn threads(&self) -> usize {
        self.n
    }

    /// Run `f(thread_index)` on the calling thread (index 0) and on every worker that
    /// joins before the caller's own call returns (indices `1..threads()`), returning
    /// when all of those are done. `f` splits the work itself with a shared dynamic
    /// counter ([`Chunks`]), so that the caller alone can finish it.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.n == 1 {
            f(0);
            return;
        }
        let _g = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: erase the lifetime; every worker that joins is done with the job
        // before we return, and none can join after we close it.
        let job: *const Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Job>(f) };
        // SAFETY: no worker reads `job` now: the previous job is closed and all who
        // joined it reported done.
        unsafe { *s.job.get() = Some(job) };
        s.done.store(0, Ordering::Relaxed);
        let epoch = (s.state.load(Ordering::Relaxed) >> 32).wrapping_add(1) & 0xFFFF_FFFF;
        s.state.store(epoch << 32, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0)));
        // Close the job: late workers skip it; wait for those that joined.
        let joined = s.state.fetch_or(CLOSED, Ordering::AcqRel) & JOINED;
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < joined {
            spins += 1;
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: every worker that joined is done with this job.
        unsafe { *s.job.get() = None };
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a samepage CPU worker panicked");
        }
    }
}

fn worker(s: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        // Spin, then park, until the epoch moves.
        let start = Instant::now();
        let mut i = 0u32;
        loop {
            if s.state.load(Ordering::Acquire) >> 32 != seen {
                break;
            }
            i += 1;
            if i.is_multiple_of(64) && start.elapsed() > SPIN {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.state.load(Ordering::SeqCst) >> 32 == seen && !s.shutdown.load(Ordering::SeqCst) {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                break;
            }
            std::hint::spin_loop();
        }
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        // Join the current job unless it is already closed (then skip it).
        let mut st = s.state.load(Ordering::Acquire);
        seen = st >> 32;
        let joined = loop {
            if st & CLOSED != 0 {
                break false;
            }
            match s
                .state
                .compare_exchange_weak(st, st + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break true,
                Err(now) if now >> 32 == seen => st = now,
                // A newer job: take part in that one instead.
                Err(now) => {
                    st = now;
                    seen = now >> 32;
                }
            }
        };
        if !joined {
            continue;
        }
        // SAFETY: `run` stored the job before publishing the epoch and keeps it alive
        // until every worker that joined has incremented `done`.
        let job = unsafe { (*s.job.get()).map(|j| &*j) };
        if let Some(job) = job {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(index))).is_err() {
                s.panicked.store(true, Ordering::Relaxed);
            }
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.shutdown.store(true, Ordering::SeqCst);
        {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Hands out `[start, end)` chunks of `0..total` to whichever thread asks first
/// (dynamic scheduling: cores shared with other work finish unevenly).
///
/// Aligned to a cache line of its own: the counter is written by every thread, and a
/// neighbour on its line (the caller's other locals, which the job reads) would be
/// re-fetched after every write.
#[repr(align(64))]
pub struct Chunks {
    next: AtomicUsize,
    total: usize,
    chunk: usize,
}

impl Chunks {
    pub fn new(total: usize, chunk: usize) -> Chunks {
        Chunks {
            next: AtomicUsize::new(0),
            total,
            chunk: chunk.max(1),
        }
    }

    pub fn next(&self) -> Option<(usize, usize)> {
        let start = self.next.fetch_add(self.chunk, Ordering::Relaxed);
        (start < self.total).then(|| (start, (start + self.chunk).min(self.total)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_job_runs_once_per_joined_thread_and_completes() {
        let pool = Pool::new(3);
        for _ in 0..1000 {
            let hits = AtomicUsize::new(0);
            let items = Chunks::new(1000, 7);
            let sum = AtomicUsize::new(0);
            pool.run(&|i| {
                hits.fetch_add(1 << (8 * i), Ordering::Relaxed);
                while let Some((a, b)) = items.next() {
                    sum.fetch_add((a..b).sum::<usize>(), Ordering::Relaxed);
                }
            });
            // The caller always runs; workers at most once each.
            let h = hits.load(Ordering::Relaxed);
            assert_eq!(h & 0xFF, 1);
            assert!((h >> 8) & 0xFF <= 1 && (h >> 16) & 0xFF <= 1, "{h:x}");
            assert_eq!(sum.load(Ordering::Relaxed), 999 * 1000 / 2);
        }
        std::thread::sleep(Duration::from_millis(5)); // let workers park
        let hits = AtomicUsize::new(0);
        pool.run(&|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert!((1..=3).contains(&hits.load(Ordering::Relaxed)));
    }

    #[test]
    fn slow_jobs_are_joined() {
        // A job long enough for the spinning workers to join.
        let pool = Pool::new(2);
        let mut both = 0;
        for _ in 0..50 {
            let hits = AtomicUsize::new(0);
            pool.run(&|_| {
                hits.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            });
            both += (hits.load(Ordering::Relaxed) == 2) as usize;
        }
        assert!(both > 0);
    }
}
