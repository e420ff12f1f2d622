//! Devices for the tensor path: opening a CUDA device the way the engine needs it, and a
//! device-time profile of the decoder layers' sections ([`section`], `BLOCKFORMER_PROFILE`).
//!
//! candle allocates every op's output with CUDA's stream-ordered allocator (`cuMemAllocAsync`)
//! from the device's default memory pool. That pool's release threshold is 0 by default: at
//! every synchronisation (the decode loop synchronises once per step, when the chosen ids come
//! back) it hands all freed memory back to the driver, and the next step maps it again. Raising
//! the threshold keeps the freed memory in the pool for reuse; [`trim_pool`] hands it back when
//! a caller wants the driver's free-memory figure to mean what is really free.

use candle_core::Device;

/// Opens CUDA device `ordinal` with its default memory pool keeping freed memory (if the
/// driver refuses that, the device still opens, with a warning: it is only slower).
pub fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    let dev = Device::new_cuda(ordinal)?;
    if let Err(e) = keep_freed_memory(&dev) {
        tracing::warn!("cuda:{ordinal}: {e}; freed memory goes back to the driver at every step");
    }
    Ok(dev)
}

/// Lets `dev`'s default memory pool keep the memory freed between synchronisations; nothing on
/// the CPU.
pub fn keep_freed_memory(dev: &Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        use cudarc::driver::{result::mem_pool, sys};
        let pool = default_pool(d)?;
        let mut threshold = u64::MAX;
        // SAFETY: the pool is the device's default pool; the release threshold is a u64.
        unsafe {
            mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        }
        .map_err(|e| candle_core::Error::Msg(format!("CUDA memory pool release threshold: {e}")))?;
    }
    let _ = dev;
    Ok(())
}

/// Waits for `dev` and hands the memory its default pool keeps back to the driver; nothing on
/// the CPU.
pub fn trim_pool(dev: &Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        dev.synchronize()?;
        let pool = default_pool(d)?;
        // SAFETY: the pool is the device's default pool.
        unsafe { cudarc::driver::result::mem_pool::trim_to(pool, 0) }
            .map_err(|e| candle_core::Error::Msg(format!("CUDA memory pool trim: {e}")))?;
    }
    let _ = dev;
    Ok(())
}

#[cfg(feature = "cuda")]
fn default_pool(
    d: &candle_core::CudaDevice,
) -> candle_core::Result<cudarc::driver::sys::CUmemoryPool> {
    let ctx = d.cuda_stream().context().clone();
    let err = |e: cudarc::driver::DriverError| candle_core::Error::Msg(format!("CUDA: {e}"));
    ctx.bind_to_thread().map_err(err)?;
    // SAFETY: the device handle comes from a live context.
    unsafe { cudarc::driver::result::device::get_default_mem_pool(ctx.cu_device()) }.map_err(err)
}

/// Sections of the tensor path timed with the device waited for at both ends (only when
/// `BLOCKFORMER_PROFILE` is set): `(name, seconds, calls)` in first-seen order.
type Profile = std::sync::Mutex<Vec<(&'static str, f64, usize)>>;

fn profile() -> Option<&'static Profile> {
    static PROFILE: std::sync::OnceLock<Option<Profile>> = std::sync::OnceLock::new();
    PROFILE
        .get_or_init(|| {
            std::env::var_os("BLOCKFORMER_PROFILE").map(|_| std::sync::Mutex::new(Vec::new()))
        })
        .as_ref()
}

/// Runs `f` as section `name` of the device-time profile: with `BLOCKFORMER_PROFILE` set, the
/// device is waited for before and after, and the time between is added to the section (which
/// slows the run down: for finding where device time goes, not for timing runs); otherwise
/// just `f()`.
pub fn section<R>(name: &'static str, dev: &Device, f: impl FnOnce() -> R) -> R {
    let Some(profile) = profile() else {
        return f();
    };
    let _ = dev.synchronize();
    let start = std::time::Instant::now();
    let r = f();
    let _ = dev.synchronize();
    let dt = start.elapsed().as_secs_f64();
    if let Ok(mut p) = profile.lock() {
        match p.iter_mut().find(|(n, _, _)| *n == name) {
            Some(e) => {
                e.1 += dt;
                e.2 += 1;
            }
            None => p.push((name, dt, 1)),
        }
    }
    r
}

/// Empties the device-time profile (e.g. after warm-up runs).
pub fn profile_reset() {
    if let Some(Ok(mut p)) = profile().map(|p| p.lock()) {
        p.clear();
    }
}

/// The device-time profile as a table (`None` unless `BLOCKFORMER_PROFILE` is set).
pub fn profile_report() -> Option<String> {
    let p = profile()?.lock().ok()?;
    let total: f64 = p.iter().map(|e| e.1).sum();
    let mut s = format!(
        "{:<24} {:>10} {:>8} {:>6}\n",
        "section", "seconds", "calls", "share"
    );
    for (name, secs, calls) in p.iter() {
        s += &format!(
            "{name:<24} {secs:>10.3} {calls:>8} {:>5.1}%\n",
            100.0 * secs / total.max(1e-12)
        );
    }
    Some(s)
}
