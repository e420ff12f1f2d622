//! Hot CPU kernels, kept apart from the model code. Each has a plain reference twin and a test
//! comparing the two. `kv_pool` holds the KV caches of the tensor (GPU) decode path.

pub mod attention;
pub mod kv_pool;
pub mod matmul;
pub mod ops;
pub mod panel;
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
