//! The kernel threads: a team of helpers that the calling thread hands
//! chunks of one kernel call (or GEMM) to, and that *spin* between calls.
//!
//! A run calls its pool once per large node: MNRL at 256×768 makes about
//! twenty calls of tens of microseconds each, Matryoshka(MNRL) about a
//! hundred. A pool whose idle workers sleep (rayon's, used before) pays a
//! futex wake-up and a context switch on every call, which was a sixth of
//! Matryoshka's time at that size. Here an idle helper spins for
//! `SPIN` before it parks, as OpenMP runtimes do; the caller runs chunks
//! itself and waits for the rest by spinning too.
//!
//! Protocol. One 64-bit word holds the call's epoch, its chunk count and
//! the next unclaimed chunk. A helper reads the job's pointer, then claims a
//! chunk by compare-and-swap on the word: the swap succeeds only while the
//! epoch is the one it read and chunks remain, so the job is still running
//! (its caller waits for every chunk) and the pointer it read is that job's.
//! A call's chunks are counted done; the caller returns once all are.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_micros(200);
/// Chunks one call may have (the word's 16-bit fields).
pub(super) const MAX_CHUNKS: usize = u16::MAX as usize;

/// A call's work: chunk `c` of `chunks`.
type Job<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// `epoch << 32 | chunks << 16 | next`.
    word: AtomicU64,
    /// The current call's `Job`, behind a thin pointer.
    job: AtomicPtr<()>,
    done: AtomicUsize,
    /// A chunk of the current call panicked.
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

/// A caller and `helpers` threads, started on first use and kept for the
/// process.
pub(super) struct Team {
    shared: Arc<Shared>,
    /// One call at a time; another caller meanwhile runs its chunks itself.
    caller: Mutex<()>,
}

fn unpack(w: u64) -> (u32, usize, usize) {
    (
        (w >> 32) as u32,
        (w >> 16) as usize & 0xffff,
        w as usize & 0xffff,
    )
}

impl Shared {
    /// Claims and runs chunks of call `epoch` until none is left.
    fn work(&self, epoch: u32) {
        loop {
            let w = self.word.load(Ordering::Acquire);
            let (e, chunks, next) = unpack(w);
            if e != epoch || next >= chunks {
                return;
            }
            let job = self.job.load(Ordering::Acquire);
            if self
                .word
                .compare_exchange_weak(w, w + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            // SAFETY: the claim succeeded while call `epoch` still had
            // unclaimed chunks, so its caller is waiting for this one and its
            // job (the pointer read before the claim, published before the
            // epoch) is alive until `done` counts it.
            let job = unsafe { *(job as *const Job) };
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(next)));
            if ok.is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }

    fn helper(&self) {
        let mut seen = unpack(self.word.load(Ordering::Acquire)).0;
        let mut idle = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = unpack(self.word.load(Ordering::Acquire)).0;
            if epoch != seen {
                seen = epoch;
                self.work(epoch);
                idle = Instant::now();
                continue;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(1024) || idle.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            while unpack(self.word.load(Ordering::SeqCst)).0 == seen {
                guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
            drop(guard);
            idle = Instant::now();
        }
    }
}

impl Team {
    /// The process's team of `threads` (the caller and `threads - 1`
    /// helpers); `None` when helpers cannot be started.
    pub(super) fn get(threads: usize) -> Option<&'static Team> {
        type Teams = Mutex<Vec<(usize, &'static Team)>>;
        static TEAMS: OnceLock<Teams> = OnceLock::new();
        let mut teams = TEAMS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = teams.iter().find(|(n, _)| *n == threads) {
            return Some(t);
        }
        let shared = Arc::new(Shared {
            word: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        for i in 1..threads {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("lossc-jit-{i}"))
                .spawn(move || s.helper())
                .ok()?;
        }
        // Kept for the process, like the threads.
        let team: &'static Team = Box::leak(Box::new(Team {
            shared,
            caller: Mutex::new(()),
        }));
        teams.push((threads, team));
        Some(team)
    }

    /// Runs `job(c)` for every chunk `c < chunks`, on the caller and the
    /// helpers, and returns when all have run. A panic in a chunk is
    /// raised here, after the others finished.
    pub(super) fn run(&self, chunks: usize, job: &(dyn Fn(usize) + Sync)) {
        if chunks <= 1 || chunks > MAX_CHUNKS {
            (0..chunks).for_each(job);
            return;
        }
        let _one = match self.caller.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                // Another run holds the team: this one runs its chunks itself.
                (0..chunks).for_each(job);
                return;
            }
        };
        let s = &self.shared;
        let epoch = unpack(s.word.load(Ordering::Acquire)).0.wrapping_add(1);
        s.done.store(0, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        s.job
            .store(&job as *const Job as *mut (), Ordering::Release);
        s.word.store(
            u64::from(epoch) << 32 | (chunks as u64) << 16,
            Ordering::SeqCst,
        );
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        s.work(epoch);
        while s.done.load(Ordering::Acquire) < chunks {
            std::hint::spin_loop();
        }
        if s.panicked.load(Ordering::Relaxed) {
            panic!("a kernel thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every chunk of every call runs exactly once, over many calls in a
    /// row (helpers spinning, claiming across epochs) and after a pause
    /// long enough for them to park.
    #[test]
    fn every_chunk_runs_once_per_call() {
        let team = Team::get(3).expect("threads");
        for call in 0..20_000usize {
            let chunks = 1 + call % 7;
            let hits: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
            team.run(chunks, &|c| {
                hits[c].fetch_add(call + 1, Ordering::Relaxed);
            });
            let got: Vec<usize> = hits.iter().map(|h| h.load(Ordering::Relaxed)).collect();
            assert_eq!(got, vec![call + 1; chunks], "call {call}");
            if call % 5000 == 4999 {
                std::thread::sleep(SPIN * 5);
            }
        }
    }

    /// Callers on several threads at once: one holds the team, the others
    /// run their chunks themselves; every call is complete.
    #[test]
    fn concurrent_callers_each_get_every_chunk() {
        let team = Team::get(2).expect("threads");
        std::thread::scope(|s| {
            for t in 0..4usize {
                s.spawn(move || {
                    for call in 0..2_000usize {
                        let sum = AtomicUsize::new(0);
                        team.run(5, &|c| {
                            sum.fetch_add(c + t, Ordering::Relaxed);
                        });
                        assert_eq!(
                            sum.load(Ordering::Relaxed),
                            10 + 5 * t,
                            "thread {t} call {call}"
                        );
                    }
                });
            }
        });
    }

    /// A chunk's panic reaches the caller after the other chunks ran, and
    /// the team keeps working.
    #[test]
    fn a_panicking_chunk_panics_the_caller() {
        let team = Team::get(4).expect("threads");
        let ran = AtomicUsize::new(0);
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            team.run(8, &|c| {
                ran.fetch_add(1, Ordering::Relaxed);
                assert_ne!(c, 5, "chunk 5 fails");
            })
        }));
        assert!(out.is_err());
        assert_eq!(ran.load(Ordering::Relaxed), 8);
        let sum = AtomicUsize::new(0);
        team.run(8, &|c| {
            sum.fetch_add(c, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 28);
    }
}
