//! The `blockformer` command line: a thin layer over the library.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // candle's element-wise thread pool spins 25k iterations before parking; on two cores
        // that spinning steals the core from the matmul and attention threads of the next op.
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    let args = cli::Cli::parse();
    if let Some(n) = args.threads {
        // Read by candle's matmul and by rayon's global pool, both created lazily.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Decoding allocates and frees the same activation and logit buffers every step; by default
/// glibc returns large blocks to the kernel and the next step pays page faults and zeroing for
/// them again. Keep blocks up to 32 MiB in the heap instead, and in one arena: a worker
/// thread's own arena lives in 64 MiB heaps that glibc unmaps as soon as they are empty, so a
/// step whose logits (3-13 MB) fill a fresh heap faulted all of them in again every step
/// (`block_main_b4_5` 128+512 batch 64: 1.27 M page faults, 5.4 s; one arena: 72 k, 3.9 s).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
