//! The tensor path's attention kernels, each with its composed twin: on CUDA each is a kernel
//! of src/kernels/cuda/attention.cu (PTX built by build.rs), elsewhere the plain loop here.
//!
//! - [`masked_softmax`]: the scores `[span, heads, n_q, t]` of the batched `q k^T` (model
//!   dtype) to probabilities in one pass; row `(s, h, q)` attends to keys `0..=limit[s, q]`.
//!   The composed form ([`reference()`]: cast to float32, scale, add a `-1e30` mask, softmax,
//!   cast back) moves every score through memory about ten times; the op reads each score
//!   once and writes each probability once, with the same float32 arithmetic.
//! - [`decode_attention`]: one query per (slot, head) straight over the KV pool (no scores
//!   tensor): each key and value row up to the slot's limit is read once, with an online
//!   softmax in float32 ([`decode_reference`]: the two batched matmuls around
//!   [`reference()`]).
//! - [`qkv_rotary`]: a layer's QKV projection to per-head queries, keys and values with the
//!   rotary embedding applied, one read and one write of each element
//!   ([`qkv_rotary_reference`]: transposes, narrows, candle's rope and a concatenation, each a
//!   copy of its own).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// Whether the tensor path on `dev` uses these fused ops: on a GPU, unless
/// `BLOCKFORMER_POOL_KERNELS=0` (their composed twins, to compare the two on a device). On the
/// CPU (the tensor path of non-float32 models) the composed ops are faster than the plain loops,
/// which `BLOCKFORMER_POOL_KERNELS=1` selects there too (to check them inside the engine).
pub fn fused_kernels(dev: &candle_core::Device) -> bool {
    static MODE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let mode = MODE.get_or_init(
        || match std::env::var("BLOCKFORMER_POOL_KERNELS").as_deref() {
            Ok("0") => Some(false),
            Ok("1") => Some(true),
            _ => None,
        },
    );
    mode.unwrap_or(!dev.is_cpu())
}

/// Whether layers take their queries, keys and values from [`qkv_rotary`]: only with
/// `BLOCKFORMER_QKV_ROTARY=1` (and the fused ops on) until its CUDA kernel, checked on an H100 by
/// tests/device.rs, has been timed there (scripts/gpu-check.sh sets it, and drops it when the
/// tests fail); otherwise [`qkv_rotary_reference`].
pub fn fused_rotary(dev: &candle_core::Device) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    fused_kernels(dev)
        && *ON.get_or_init(|| std::env::var("BLOCKFORMER_QKV_ROTARY").as_deref() == Ok("1"))
}

#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

/// Runs `$body` with `$T` the element type of float dtype `$dt` (f32, bf16, f16); other dtypes
/// are an error naming op `$op`.
macro_rules! by_float_dtype {
    ($dt:expr, $op:literal, $T:ident => $body:expr) => {
        match $dt {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            other => candle_core::bail!("{}: {other:?} tensors, expected f32, bf16 or f16", $op),
        }
    };
}

/// The contiguous range of an input's elements, or an error naming op and input.
fn range(l: &Layout, op: &str, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} not contiguous")))
}

/// An element type the kernels take (f32, bf16, f16) as candle's CUDA storage holds it.
#[cfg(feature = "cuda")]
trait KernelElem:
    WithDType + candle_core::cuda_backend::CudaDType + cudarc::driver::DeviceRepr
{
}
#[cfg(feature = "cuda")]
impl<T: WithDType + candle_core::cuda_backend::CudaDType + cudarc::driver::DeviceRepr> KernelElem
    for T
{
}

/// The name of kernel `op` for elements of `dt` in src/kernels/cuda/attention.cu.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // used by the CUDA build and the tests
fn kernel_name(op: &str, dt: DType) -> String {
    format!("{op}_{}", dt.as_str())
}

/// Kernel `op` for element type `T` ([`kernel_name`]) from the PTX module; launched on the
/// device's stream (`dev.cuda_stream().launch_builder`).
#[cfg(feature = "cuda")]
fn kernel<T: WithDType>(
    dev: &candle_core::CudaDevice,
    op: &str,
) -> candle_core::Result<cudarc::driver::CudaFunction> {
    let name = kernel_name(op, T::DTYPE);
    Ok(dev
        .get_or_load_custom_func(&name, "blockformer_attention", PTX)?
        .into_cuda_function())
}

/// `softmax(scale * scores + mask)` over the last axis, in float32, returned in the scores'
/// dtype: `scores` `[span, heads, n_q, t]`, `limit` (u32) `[span, .., n_q, ..]` holding the last
/// key each (slot, query) may attend to.
pub fn masked_softmax(scores: &Tensor, limit: &Tensor, scale: f32) -> candle_core::Result<Tensor> {
    let (span, heads, n_q, _) = scores.dims4()?;
    if limit.elem_count() != span * n_q || limit.dtype() != DType::U32 {
        candle_core::bail!(
            "masked_softmax: limit {:?} {:?}, expected {} u32 values (span {span} x n_q {n_q})",
            limit.shape(),
            limit.dtype(),
            span * n_q
        );
    }
    let op = MaskedSoftmax { scale, heads, n_q };
    scores
        .contiguous()?
        .apply_op2_no_bwd(&limit.flatten_all()?.contiguous()?, &op)
}

/// The composed twin: float32 scores, scaled, plus `0` / `-1e30` from the limits, softmax,
/// back to the scores' dtype.
pub fn reference(scores: &Tensor, limit: &Tensor, scale: f32) -> candle_core::Result<Tensor> {
    let (span, _, n_q, t) = scores.dims4()?;
    let limit = limit.reshape((span, 1, n_q, 1))?;
    let keys = Tensor::arange(0u32, t as u32, scores.device())?.reshape((1, 1, 1, t))?;
    let mask = ((keys.broadcast_le(&limit)?.to_dtype(DType::F32)? - 1.0)? * 1e30)?;
    let s = (scores.to_dtype(DType::F32)? * scale as f64)?.broadcast_add(&mask)?;
    candle_nn::ops::softmax_last_dim(&s)?.to_dtype(scores.dtype())
}

struct MaskedSoftmax {
    scale: f32,
    heads: usize,
    n_q: usize,
}

/// One row: `y[j] = exp(scale x[j] - m) / sum` for `j <= lim`, 0 after.
fn row<T: WithDType>(x: &[T], y: &mut [T], lim: usize, scale: f32) {
    let lim = lim.min(x.len() - 1);
    let z = |v: T| scale * v.to_f64() as f32;
    let m = x[..=lim]
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(z(v)));
    let sum: f32 = x[..=lim].iter().map(|&v| (z(v) - m).exp()).sum();
    let inv = 1.0 / sum;
    for (j, (o, &v)) in y.iter_mut().zip(x).enumerate() {
        let p = if j <= lim {
            (z(v) - m).exp() * inv
        } else {
            0.0
        };
        *o = T::from_f64(p as f64);
    }
}

impl MaskedSoftmax {
    fn cpu<T: WithDType>(&self, x: &[T], limit: &[u32], t: usize) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        for (r, (xr, yr)) in x.chunks_exact(t).zip(y.chunks_exact_mut(t)).enumerate() {
            let (s, q) = (r / (self.n_q * self.heads), r % self.n_q);
            row(xr, yr, limit[s * self.n_q + q] as usize, self.scale);
        }
        y
    }
}

impl candle_core::CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let t = l1.shape().dims().last().copied().unwrap_or(1);
        let (a, b) = range(l1, "masked_softmax", "scores")?;
        let (c, d) = range(l2, "masked_softmax", "limit")?;
        let limit = &s2.as_slice::<u32>()?[c..d];
        let out = by_float_dtype!(s1.dtype(), "masked_softmax", T => {
            T::to_cpu_storage_owned(self.cpu(&s1.as_slice::<T>()?[a..b], limit, t))
        });
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out =
            by_float_dtype!(s1.dtype(), "masked_softmax", T => self.launch::<T>(s1, l1, s2, l2)?);
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
impl MaskedSoftmax {
    fn launch<T: KernelElem>(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<candle_core::CudaStorage> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        let t = l1.shape().dims().last().copied().unwrap_or(1);
        let (a, b) = range(l1, "masked_softmax", "scores")?;
        let (c, d) = range(l2, "masked_softmax", "limit")?;
        let dev = &s1.device;
        let x = s1.as_cuda_slice::<T>()?.slice(a..b);
        let limit = s2.as_cuda_slice::<u32>()?.slice(c..d);
        // One block per row; up to 256 threads, fewer for short rows.
        let threads = t.div_ceil(32).clamp(1, 8) as u32 * 32;
        let cfg = LaunchConfig {
            grid_dim: (((b - a) / t) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (t32, heads, n_q) = (t as u32, self.heads as u32, self.n_q as u32);
        let func = kernel::<T>(dev, "masked_softmax")?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(b - a) }?;
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder.arg(&x);
        builder.arg(&limit);
        builder.arg(&y);
        builder.arg(&t32);
        builder.arg(&heads);
        builder.arg(&n_q);
        builder.arg(&self.scale);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(T::wrap_cuda_slice(y, dev.clone()))
    }
}

/// Head sizes [`decode_attention`] takes (the kernel keeps `head_dim / 32` elements per lane).
pub fn decode_supported(head_dim: usize) -> bool {
    matches!(head_dim, 32 | 64 | 128)
}

/// Attention of one query per (slot, head) over slots `lo..lo + span` of a KV pool:
/// `q` `[span, heads, 1, hd]`, `kpool`/`vpool` `[slots, heads, cap, hd]` (keys rotated), slot
/// `lo + s` attending to positions `0..=limit[s]` (`limit` u32, `span` values); returns
/// `[span, heads, 1, hd]` in `q`'s dtype.
pub fn decode_attention(
    q: &Tensor,
    kpool: &Tensor,
    vpool: &Tensor,
    lo: usize,
    limit: &Tensor,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let (span, heads, n_q, hd) = q.dims4()?;
    let (slots, kh, cap, khd) = kpool.dims4()?;
    if n_q != 1
        || (kh, khd) != (heads, hd)
        || lo + span > slots
        || vpool.dims() != kpool.dims()
        || !decode_supported(hd)
        || limit.elem_count() != span
        || limit.dtype() != DType::U32
    {
        candle_core::bail!(
            "decode_attention: q {:?}, pools {:?}/{:?}, slots {lo}.., limit {:?} {:?}: expected \
             one query per slot and head, head_dim 32, 64 or 128, one u32 limit per slot",
            q.shape(),
            kpool.shape(),
            vpool.shape(),
            limit.shape(),
            limit.dtype()
        );
    }
    let op = DecodeAttention {
        lo,
        heads,
        cap,
        hd,
        limit: limit.flatten_all()?.contiguous()?,
        scale,
    };
    q.contiguous()?.apply_op3_no_bwd(kpool, vpool, &op)
}

/// The composed twin of [`decode_attention`]: `q k^T` over positions `0..t`, [`reference()`],
/// then `p v`.
pub fn decode_reference(
    q: &Tensor,
    kpool: &Tensor,
    vpool: &Tensor,
    lo: usize,
    limit: &Tensor,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let span = q.dim(0)?;
    let kg = kpool.narrow(0, lo, span)?;
    let vg = vpool.narrow(0, lo, span)?;
    let scores = q.contiguous()?.matmul(&kg.t()?)?;
    let p = reference(&scores, &limit.reshape((span, 1, 1, 1))?, scale)?;
    p.matmul(&vg)
}

struct DecodeAttention {
    lo: usize,
    heads: usize,
    cap: usize,
    hd: usize,
    /// `[span]` (u32), contiguous.
    limit: Tensor,
    scale: f32,
}

impl DecodeAttention {
    /// One (slot, head) at a time, keys and values read once, online softmax in float32.
    fn cpu<T: WithDType>(&self, q: &[T], k: &[T], v: &[T], limit: &[u32]) -> Vec<T> {
        let (heads, cap, hd) = (self.heads, self.cap, self.hd);
        let f = |x: T| x.to_f64() as f32;
        let mut out = vec![T::zero(); q.len()];
        out.par_chunks_mut(hd).enumerate().for_each(|(b, o)| {
            let lim = (limit[b / heads] as usize).min(cap - 1);
            let base = (self.lo * heads + b) * cap * hd;
            let qv: Vec<f32> = q[b * hd..(b + 1) * hd]
                .iter()
                .map(|&x| f(x) * self.scale)
                .collect();
            let mut acc = vec![0f32; hd];
            let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
            for j in 0..=lim {
                let row = base + j * hd..base + (j + 1) * hd;
                let s: f32 = qv.iter().zip(&k[row.clone()]).map(|(a, &x)| a * f(x)).sum();
                let m_new = m.max(s);
                let (corr, p) = ((m - m_new).exp(), (s - m_new).exp());
                l = l * corr + p;
                for (a, &x) in acc.iter_mut().zip(&v[row]) {
                    *a = *a * corr + p * f(x);
                }
                m = m_new;
            }
            for (o, a) in o.iter_mut().zip(acc) {
                *o = T::from_f64((a / l) as f64);
            }
        });
        out
    }

    /// The limits' storage (a tensor of the op, not one of its inputs) and their range.
    fn limit(&self) -> candle_core::Result<(candle_core::StorageRef<'_>, (usize, usize))> {
        let (storage, l) = self.limit.storage_and_layout();
        let r = range(l, "decode_attention", "limit")?;
        Ok((storage, r))
    }
}

impl candle_core::CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = "decode_attention";
        let (r1, r2, r3) = (
            range(l1, op, "q")?,
            range(l2, op, "keys")?,
            range(l3, op, "values")?,
        );
        let (storage, (la, lb)) = self.limit()?;
        let Storage::Cpu(limit) = &*storage else {
            candle_core::bail!("decode_attention: limit must be on the CPU");
        };
        let limit = &limit.as_slice::<u32>()?[la..lb];
        let out = by_float_dtype!(s1.dtype(), "decode_attention", T => {
            let (q, k, v) = (s1.as_slice::<T>()?, s2.as_slice::<T>()?, s3.as_slice::<T>()?);
            let y = self.cpu(&q[r1.0..r1.1], &k[r2.0..r2.1], &v[r3.0..r3.1], limit);
            T::to_cpu_storage_owned(y)
        });
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = by_float_dtype!(s1.dtype(), "decode_attention", T => {
            self.launch::<T>((s1, l1), (s2, l2), (s3, l3))?
        });
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
impl DecodeAttention {
    fn launch<T: KernelElem>(
        &self,
        (s1, l1): (&candle_core::CudaStorage, &Layout),
        (s2, l2): (&candle_core::CudaStorage, &Layout),
        (s3, l3): (&candle_core::CudaStorage, &Layout),
    ) -> candle_core::Result<candle_core::CudaStorage> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        let op = "decode_attention";
        let ((a1, b1), (a2, b2), (a3, b3)) = (
            range(l1, op, "q")?,
            range(l2, op, "keys")?,
            range(l3, op, "values")?,
        );
        let dev = &s1.device;
        let (storage, (la, lb)) = self.limit()?;
        let Storage::Cuda(limit) = &*storage else {
            candle_core::bail!("decode_attention: limit must be on the GPU");
        };
        let limit = limit.as_cuda_slice::<u32>()?.slice(la..lb);
        // The pools from slot `lo` on: block `s * heads + h` reads slot `lo + s`, head `h`.
        let first = self.lo * self.heads * self.cap * self.hd;
        let q = s1.as_cuda_slice::<T>()?.slice(a1..b1);
        let k = s2.as_cuda_slice::<T>()?.slice(a2 + first..b2);
        let v = s3.as_cuda_slice::<T>()?.slice(a3 + first..b3);
        let cfg = LaunchConfig {
            grid_dim: (((b1 - a1) / self.hd) as u32, 1, 1), // span * heads
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (heads, cap) = (self.heads as u32, self.cap as u32);
        let func = kernel::<T>(dev, &format!("decode_attention_{}", self.hd))?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(b1 - a1) }?;
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder.arg(&q);
        builder.arg(&k);
        builder.arg(&v);
        builder.arg(&limit);
        builder.arg(&out);
        builder.arg(&heads);
        builder.arg(&cap);
        builder.arg(&self.scale);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
}

/// Queries, keys and values `[3, heads, N, hd]` (contiguous) from a layer's QKV projection
/// `qkv` `[N, heads * 3 hd]` (per head: query, key, value), the first `rd` dims of queries and
/// keys rotated GPT-NeoX style by `cos`/`sin` `[N, rd/2]`; arithmetic in float32.
pub fn qkv_rotary(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    rd: usize,
) -> candle_core::Result<Tensor> {
    let (n, w3) = qkv.dims2()?;
    let hd = w3 / (3 * heads);
    if hd * 3 * heads != w3 || rd > hd || !rd.is_multiple_of(2) || cos.dims() != [n, rd / 2] {
        candle_core::bail!(
            "qkv_rotary: qkv {:?}, cos {:?}, {heads} heads, {rd} rotary dims: expected \
             [N, heads * 3 head_dim] and [N, rd / 2] with rd even and at most head_dim",
            qkv.shape(),
            cos.shape()
        );
    }
    let op = QkvRotary { heads, hd, rd };
    qkv.contiguous()?
        .apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)
}

/// The composed twin of [`qkv_rotary`]: per-head views of the projection, candle's rope on the
/// first `rd` dims of queries and keys, joined back to the full head.
pub fn qkv_rotary_reference(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    rd: usize,
) -> candle_core::Result<Tensor> {
    let (n, w3) = qkv.dims2()?;
    let hd = w3 / (3 * heads);
    let qkv = qkv.reshape((n, heads, 3 * hd))?.transpose(0, 1)?; // [heads, N, 3hd]
    let rotate = |z: Tensor| -> candle_core::Result<Tensor> {
        if rd == 0 {
            return z.contiguous();
        }
        let zr = z.narrow(2, 0, rd)?.contiguous()?.unsqueeze(0)?; // [1, heads, N, rd]
        let r = candle_nn::rotary_emb::rope(&zr, cos, sin)?.squeeze(0)?;
        if rd == hd {
            Ok(r)
        } else {
            Tensor::cat(&[&r, &z.narrow(2, rd, hd - rd)?], 2)?.contiguous()
        }
    };
    let q = rotate(qkv.narrow(2, 0, hd)?)?;
    let k = rotate(qkv.narrow(2, hd, hd)?)?;
    let v = qkv.narrow(2, 2 * hd, hd)?.contiguous()?;
    Tensor::stack(&[q, k, v], 0)
}

struct QkvRotary {
    heads: usize,
    hd: usize,
    rd: usize,
}

impl QkvRotary {
    fn cpu<T: WithDType>(&self, qkv: &[T], cos: &[T], sin: &[T]) -> Vec<T> {
        let (heads, hd, rd) = (self.heads, self.hd, self.rd);
        let n = qkv.len() / (3 * heads * hd);
        let half = rd / 2;
        let f = |x: T| x.to_f64() as f32;
        let mut out = vec![T::zero(); qkv.len()];
        out.par_chunks_mut(hd).enumerate().for_each(|(r, o)| {
            let (ph, pos) = (r / n, r % n);
            let (part, h) = (ph / heads, ph % heads);
            let src = &qkv[(pos * heads + h) * 3 * hd + part * hd..][..hd];
            for (d, od) in o.iter_mut().enumerate() {
                let mut x = f(src[d]);
                if part < 2 && d < rd {
                    let j = if d < half { d } else { d - half };
                    let (c, s) = (f(cos[pos * half + j]), f(sin[pos * half + j]));
                    x = if d < half {
                        x * c - f(src[d + half]) * s
                    } else {
                        x * c + f(src[d - half]) * s
                    };
                }
                *od = T::from_f64(x as f64);
            }
        });
        out
    }
}

impl candle_core::CustomOp3 for QkvRotary {
    fn name(&self) -> &'static str {
        "qkv-rotary"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = "qkv_rotary";
        let (r1, r2, r3) = (
            range(l1, op, "qkv")?,
            range(l2, op, "cos")?,
            range(l3, op, "sin")?,
        );
        let out = by_float_dtype!(s1.dtype(), "qkv_rotary", T => {
            let (x, c, s) = (s1.as_slice::<T>()?, s2.as_slice::<T>()?, s3.as_slice::<T>()?);
            T::to_cpu_storage_owned(self.cpu(&x[r1.0..r1.1], &c[r2.0..r2.1], &s[r3.0..r3.1]))
        });
        Ok((out, self.shape(l1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = by_float_dtype!(s1.dtype(), "qkv_rotary", T => {
            self.launch::<T>((s1, l1), (s2, l2), (s3, l3))?
        });
        Ok((out, self.shape(l1)))
    }
}

#[cfg(feature = "cuda")]
impl QkvRotary {
    fn launch<T: KernelElem>(
        &self,
        (s1, l1): (&candle_core::CudaStorage, &Layout),
        (s2, l2): (&candle_core::CudaStorage, &Layout),
        (s3, l3): (&candle_core::CudaStorage, &Layout),
    ) -> candle_core::Result<candle_core::CudaStorage> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        let op = "qkv_rotary";
        let ((a1, b1), (a2, b2), (a3, b3)) = (
            range(l1, op, "qkv")?,
            range(l2, op, "cos")?,
            range(l3, op, "sin")?,
        );
        let dev = &s1.device;
        let x = s1.as_cuda_slice::<T>()?.slice(a1..b1);
        let c = s2.as_cuda_slice::<T>()?.slice(a2..b2);
        let s = s3.as_cuda_slice::<T>()?.slice(a3..b3);
        let n = (b1 - a1) / (3 * self.heads * self.hd);
        let per_part = (n * self.hd) as u32;
        let cfg = LaunchConfig {
            grid_dim: (
                per_part.div_ceil(256).clamp(1, 4096),
                3 * self.heads as u32,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n32, heads, hd, rd) = (n as u32, self.heads as u32, self.hd as u32, self.rd as u32);
        let func = kernel::<T>(dev, "qkv_rotary")?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(b1 - a1) }?;
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder.arg(&x);
        builder.arg(&c);
        builder.arg(&s);
        builder.arg(&out);
        builder.arg(&n32);
        builder.arg(&heads);
        builder.arg(&hd);
        builder.arg(&rd);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
}

impl QkvRotary {
    /// `[3, heads, N, hd]` for a projection of layout `l`.
    fn shape(&self, l: &Layout) -> Shape {
        let n = l.shape().elem_count() / (3 * self.heads * self.hd);
        Shape::from((3, self.heads, n, self.hd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every kernel the ops ask for is defined in the CUDA source (checked here, where no GPU
    /// runs them).
    #[test]
    fn kernel_names_exist_in_the_cuda_source() {
        let src = include_str!("cuda/attention.cu");
        let mut ops = vec!["masked_softmax".to_string(), "qkv_rotary".to_string()];
        // The head sizes `decode_supported` takes.
        ops.extend([32, 64, 128].map(|hd| format!("decode_attention_{hd}")));
        for op in &ops {
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let name = kernel_name(op, dt);
                assert!(src.contains(&format!("({name},")), "{name} is not defined");
            }
        }
    }

    /// The op equals its composed twin in every dtype, for long and short rows, limits inside,
    /// at and past the row.
    #[test]
    fn equals_the_composed_softmax() {
        let dev = Device::Cpu;
        let (span, heads, n_q, t) = (3, 2, 4, 37);
        let scores = Tensor::randn(0f32, 3.0, (span, heads, n_q, t), &dev).unwrap();
        let limit: Vec<u32> = (0..span * n_q)
            .map(|i| [0, 5, 36, 80][i % 4] + i as u32 % 3)
            .collect();
        let limit = Tensor::from_vec(limit, (span, 1, n_q, 1), &dev).unwrap();
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let s = scores.to_dtype(dt).unwrap();
            let a = masked_softmax(&s, &limit, 0.125).unwrap();
            let b = reference(&s, &limit, 0.125).unwrap();
            assert_eq!(a.dtype(), dt);
            let diff = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let tol = if dt == DType::F32 { 1e-6 } else { 1e-2 };
            assert!(diff <= tol, "{dt:?}: max |diff| {diff}");
        }
    }
}
