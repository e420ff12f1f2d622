//! Hot CPU kernels, kept apart from the model code. Each has a plain reference twin and a test
//! comparing the two. `kv_pool` holds the KV caches of the tensor (GPU) decode path.

pub mod attention;
pub mod kv_pool;
pub mod matmul;
pub mod ops;
pub mod panel;
pub mod train_attention;
