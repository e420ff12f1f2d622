//! Hot CPU kernels, kept apart from the model code. Each has a plain reference twin and a test
//! comparing the two.

pub mod attention;
pub mod matmul;
pub mod ops;
