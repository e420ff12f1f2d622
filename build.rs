//! With the `cuda` feature: compiles the CUDA kernels in src/kernels/cuda to PTX with nvcc
//! (scripts/build-cuda.sh puts a CUDA 13.0 nvcc on PATH). Without it: nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/kernels/cuda");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let src = "src/kernels/cuda/attention.cu";
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(src)
        .arg("-o")
        .arg(out.join("attention.ptx"))
        .status()
        .unwrap_or_else(|e| panic!("{}: cannot run nvcc for {src}: {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on {src}");
}
