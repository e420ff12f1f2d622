//! Hot kernels, kept apart from the model code. Each has a plain reference twin and a test
//! comparing the two. `kv_pool` holds the KV caches of the tensor (GPU) decode path and
//! `pool_attention` its fused attention ops (CUDA kernels in `cuda/attention.cu`).

pub mod attention;
pub mod kv_pool;
pub mod matmul;
pub mod ops;
pub mod panel;
pub mod pool_attention;
pub mod screen;
pub mod train_attention;

thread_local! {
    /// Set while the calling thread runs one share of work its caller already split across
    /// threads ([`serial`]).
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the kernels' parallel loops kept on the calling thread: for a caller that
/// already gave each thread its own share (e.g. rows of a decode step), where forking every
/// small kernel again would cost more than it gains.
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.set(self.0);
        }
    }
    let _restore = Restore(SERIAL.replace(true));
    f()
}

/// Whether the calling thread runs inside [`serial`].
pub(crate) fn in_serial() -> bool {
    SERIAL.get()
}

/// The least items one job of a kernel's parallel loop takes (`with_min_len`): all of them
/// inside [`serial`], so the loop runs on the calling thread.
pub(crate) fn min_len() -> usize {
    if in_serial() {
        usize::MAX
    } else {
        1
    }
}

/// How long a worker kept awake by [`with_workers_awake`] polls without finding work before
/// it goes back to rayon's own idle loop (and to sleep).
pub const AWAKE_IDLE_LIMIT: std::time::Duration = std::time::Duration::from_millis(1);

/// Runs `f` with the pool's other workers kept awake: each polls for work to steal (rayon's
/// `yield_now`) until `f` returns, instead of going to sleep whenever the pool runs out of
/// work for a moment and being woken again by the next parallel loop. A decode step is
/// hundreds of short parallel loops separated by serial moments (a LayerNorm, a rotary, the
/// sampler): asleep, a worker joins each loop late, and the caller meanwhile does its share.
/// Called on a pool worker (as [`crate::generate::Engine::step`] runs); elsewhere, or with one
/// thread, it just runs `f`.
///
/// A worker also gives up after [`AWAKE_IDLE_LIMIT`] without work. That bounds the one
/// hazard of a poller that is itself a rayon job: a worker can pick it up while it waits
/// inside a job of `f` (or of another caller's `f`), and then that job cannot finish until the
/// poller returns.
pub fn with_workers_awake<R>(f: impl FnOnce() -> R) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let Some(me) = rayon::current_thread_index() else {
        return f();
    };
    if rayon::current_num_threads() < 2 {
        return f();
    }
    struct Done(Arc<AtomicBool>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let done = Done(Arc::new(AtomicBool::new(false)));
    let flag = done.0.clone();
    rayon::spawn_broadcast(move |ctx| {
        if ctx.index() == me {
            return;
        }
        let mut idle_since = std::time::Instant::now();
        while !flag.load(Ordering::Acquire) {
            match rayon::yield_now() {
                Some(rayon::Yield::Executed) => idle_since = std::time::Instant::now(),
                _ => {
                    if idle_since.elapsed() > AWAKE_IDLE_LIMIT {
                        break;
                    }
                    // Idle: wait a little before looking at the other deques again, so the
                    // polling does not bounce their cache lines under the caller's pushes.
                    for _ in 0..32 {
                        std::hint::spin_loop();
                    }
                }
            }
        }
    });
    f()
}

/// Raw output pointer shared by parallel tasks that each write their own disjoint part of one
/// buffer (attention: `(position, head)` slots; panel matmul: column panels).
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements, and the buffer outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// A buffer of `n` zeros. Large buffers first ask Linux for transparent huge pages: on first
/// touch a 2 MiB page faults in several times faster per byte than 4 KiB pages (KV caches and
/// prompt activations are touched fresh by every request). The buffer comes zeroed from the
/// allocator (fresh pages are zero already) and nothing writes it here: its pages fault in
/// where the kernels first write them, on every thread, instead of in one serial fill.
pub fn zeroed<T: bytemuck::Zeroable>(n: usize) -> Vec<T> {
    let v: Vec<T> = bytemuck::zeroed_vec(n);
    advise_huge_pages(v.as_ptr() as usize, n * std::mem::size_of::<T>());
    v
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(addr: usize, bytes: usize) {
    const PAGE: usize = 4096;
    const HUGE: usize = 2 << 20;
    if bytes < 2 * HUGE {
        return;
    }
    let start = addr.next_multiple_of(PAGE);
    let end = (addr + bytes) & !(PAGE - 1);
    // SAFETY: the range lies inside an allocation this process owns and has not touched yet;
    // the advice only changes how its pages are backed, never their contents.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_addr: usize, _bytes: usize) {}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::Arc;

    /// Nested parallel loops inside `with_workers_awake`, from several callers at once on one
    /// two-thread pool (the pollers then land inside each other's jobs): every result right,
    /// and no caller stuck.
    #[test]
    fn workers_kept_awake_give_the_same_results_and_never_hang() {
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap(),
        );
        let expected: u64 = (0..64u64)
            .map(|i| (0..256u64).map(|j| i * j).sum::<u64>())
            .sum();
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let (pool, tx) = (pool.clone(), tx.clone());
            std::thread::spawn(move || {
                for _ in 0..200 {
                    let got = pool.install(|| {
                        rayon::scope(|_| {
                            with_workers_awake(|| {
                                (0..64u64)
                                    .into_par_iter()
                                    .map(|i| {
                                        (0..256u64).into_par_iter().map(|j| i * j).sum::<u64>()
                                    })
                                    .sum::<u64>()
                            })
                        })
                    });
                    tx.send(got).unwrap();
                }
            });
        }
        drop(tx);
        for _ in 0..800 {
            let got = rx
                .recv_timeout(std::time::Duration::from_secs(120))
                .expect("a caller of with_workers_awake is stuck");
            assert_eq!(got, expected);
        }
        // Outside a pool it just runs the closure.
        assert_eq!(with_workers_awake(|| 7), 7);
    }
}
