//! Hot CPU kernels, kept apart from the model code. Each has a plain reference twin and a test
//! comparing the two. `kv_pool` holds the KV caches of the tensor (GPU) decode path.

pub mod attention;
pub mod kv_pool;
pub mod matmul;
pub mod ops;
pub mod panel;
pub mod train_attention;

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
