use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    for (m, k, n) in [
        (8usize, 768usize, 50304usize),
        (8, 768, 2304),
        (8, 768, 3072),
        (8, 3072, 768),
        (1, 768, 3072),
    ] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &d)?;
        let wt = w.t()?.contiguous()?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &d)?;
        for (name, rhs) in [("w.t()", w.t()?), ("contig", wt.clone())] {
            let _ = x.matmul(&rhs)?;
            let t = Instant::now();
            let it = 20;
            for _ in 0..it {
                let _ = x.matmul(&rhs)?;
            }
            let s = t.elapsed().as_secs_f64() / it as f64;
            println!(
                "{m}x{k}x{n} {name}: {:.3} ms, {:.1} GFLOP/s",
                s * 1e3,
                2.0 * (m * k * n) as f64 / s / 1e9
            );
        }
    }
    Ok(())
}
