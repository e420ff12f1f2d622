//! Causal self-attention of the training path as one differentiable op (CPU, float32).
//!
//! Composed from candle ops, one attention layer is about fifteen graph nodes (reshape,
//! transpose, three narrows and copies, rotary, `Q K^T`, masked softmax, `P V`, transpose,
//! reshape), and candle's backward gives each a zero-filled gradient plus an add, the narrows a
//! zero-padded concatenation each. Here it is one node: per (batch row, head)
//!
//! ```text
//! q, k, v = split(qkv), rotary on q and k
//! P = softmax(scale * q k^T + bias)          bias: causal and padding mask [B, 1, T, T]
//! o = P v
//! ```
//!
//! and backward (recomputing `P`):
//!
//! ```text
//! dP = do v^T;  dS = P * (dP - rowsum(P * dP));  dq = scale dS k;  dk = scale dS^T q
//! dv = P^T do;  dq, dk rotated back (the rotation is orthogonal)
//! ```

use super::attention::Rotary;
use super::matmul::gemm_strided;
use super::ops::input;
use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// `qkv [B*T, 3W]` (GPT-NeoX per-head interleaved `[q | k | v]`), `bias [B, 1, T, T]` ->
/// attention output `[B*T, W]` (heads in order).
pub struct CausalAttentionOp {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub rotary: Arc<Rotary>,
}

fn mm(
    mkn: (usize, usize, usize),
    dst: &mut [f32],
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    alpha: f32,
) {
    gemm_strided(mkn, dst, lhs, lhs_strides, rhs, rhs_strides, alpha, false)
}

/// One (batch row, head): rotated queries and keys, values, and the probabilities.
struct Head {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
}

impl CausalAttentionOp {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Loads head `h` of batch row `b` from `qkv` and computes its probabilities.
    fn head(&self, qkv: &[f32], bias: &[f32], b: usize, h: usize) -> Head {
        let (t, hd, w) = (self.seq, self.head_dim, self.width());
        let mut q = vec![0f32; t * hd];
        let mut k = vec![0f32; t * hd];
        let mut v = vec![0f32; t * hd];
        for i in 0..t {
            let base = (b * t + i) * 3 * w + h * 3 * hd;
            let (qi, ki) = (&mut q[i * hd..(i + 1) * hd], &mut k[i * hd..(i + 1) * hd]);
            qi.copy_from_slice(&qkv[base..base + hd]);
            ki.copy_from_slice(&qkv[base + hd..base + 2 * hd]);
            v[i * hd..(i + 1) * hd].copy_from_slice(&qkv[base + 2 * hd..base + 3 * hd]);
            self.rotary.apply(qi, i);
            self.rotary.apply(ki, i);
        }
        // P = softmax(scale q k^T + bias), rows with max subtraction.
        let scale = 1.0 / (hd as f32).sqrt();
        let mut p = vec![0f32; t * t];
        mm((t, hd, t), &mut p, &q, (hd, 1), &k, (1, hd), scale);
        let bias = &bias[b * t * t..(b + 1) * t * t];
        for (row, brow) in p.chunks_exact_mut(t).zip(bias.chunks_exact(t)) {
            let mut m = f32::NEG_INFINITY;
            for (x, bb) in row.iter_mut().zip(brow) {
                *x += bb;
                m = m.max(*x);
            }
            let mut z = 0f32;
            for x in row.iter_mut() {
                *x = (*x - m).exp();
                z += *x;
            }
            let inv = 1.0 / z;
            row.iter_mut().for_each(|x| *x *= inv);
        }
        Head { q, k, v, p }
    }

    fn check(&self, qkv: &Layout, bias: &Layout) -> candle_core::Result<()> {
        let (bt, t) = (self.batch * self.seq, self.seq);
        if qkv.dims() != [bt, 3 * self.width()] || bias.dims() != [self.batch, 1, t, t] {
            candle_core::bail!(
                "causal-attention: expected qkv [{bt}, {}] and bias [{}, 1, {t}, {t}], got {:?} and {:?}",
                3 * self.width(),
                self.batch,
                qkv.dims(),
                bias.dims()
            )
        }
        Ok(())
    }
}

impl candle_core::CustomOp2 for CausalAttentionOp {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.check(l1, l2)?;
        let (qkv, bias) = (input(s1, l1, self.name())?, input(s2, l2, self.name())?);
        let (t, hd, w) = (self.seq, self.head_dim, self.width());
        let outs: Vec<Vec<f32>> = (0..self.batch * self.heads)
            .into_par_iter()
            .map(|task| {
                let (b, h) = (task / self.heads, task % self.heads);
                let hh = self.head(qkv, bias, b, h);
                let mut o = vec![0f32; t * hd];
                mm((t, t, hd), &mut o, &hh.p, (t, 1), &hh.v, (hd, 1), 1.0);
                o
            })
            .collect();
        let mut out = vec![0f32; self.batch * t * w];
        for (task, o) in outs.iter().enumerate() {
            let (b, h) = (task / self.heads, task % self.heads);
            for i in 0..t {
                let dst = (b * t + i) * w + h * hd;
                out[dst..dst + hd].copy_from_slice(&o[i * hd..(i + 1) * hd]);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((self.batch * t, w))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let host = |x: &Tensor| -> candle_core::Result<Vec<f32>> { x.flatten_all()?.to_vec1() };
        let (qv, bv, gv) = (host(qkv)?, host(bias)?, host(grad)?);
        let (t, hd, w) = (self.seq, self.head_dim, self.width());
        let scale = 1.0 / (hd as f32).sqrt();
        // Per task: dq, dk, dv [T, hd] each.
        let parts: Vec<[Vec<f32>; 3]> = (0..self.batch * self.heads)
            .into_par_iter()
            .map(|task| {
                let (b, h) = (task / self.heads, task % self.heads);
                let Head { q, k, v, p } = self.head(&qv, &bv, b, h);
                let mut d_o = vec![0f32; t * hd];
                for i in 0..t {
                    let src = (b * t + i) * w + h * hd;
                    d_o[i * hd..(i + 1) * hd].copy_from_slice(&gv[src..src + hd]);
                }
                // dS = P * (dP - rowsum(P * dP)), dP = dO v^T.
                let mut ds = vec![0f32; t * t];
                mm((t, hd, t), &mut ds, &d_o, (hd, 1), &v, (1, hd), 1.0);
                for (drow, prow) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                    let s: f32 = drow.iter().zip(prow).map(|(a, b)| a * b).sum();
                    for (d, pp) in drow.iter_mut().zip(prow) {
                        *d = pp * (*d - s);
                    }
                }
                let mut dq = vec![0f32; t * hd];
                let mut dk = vec![0f32; t * hd];
                let mut dv = vec![0f32; t * hd];
                mm((t, t, hd), &mut dq, &ds, (t, 1), &k, (hd, 1), scale);
                mm((t, t, hd), &mut dk, &ds, (1, t), &q, (hd, 1), scale);
                mm((t, t, hd), &mut dv, &p, (1, t), &d_o, (hd, 1), 1.0);
                for i in 0..t {
                    self.rotary
                        .apply_signed(&mut dq[i * hd..(i + 1) * hd], i, true);
                    self.rotary
                        .apply_signed(&mut dk[i * hd..(i + 1) * hd], i, true);
                }
                [dq, dk, dv]
            })
            .collect();
        let mut dqkv = vec![0f32; self.batch * t * 3 * w];
        for (task, d) in parts.iter().enumerate() {
            let (b, h) = (task / self.heads, task % self.heads);
            for i in 0..t {
                let base = (b * t + i) * 3 * w + h * 3 * hd;
                for (j, dj) in d.iter().enumerate() {
                    dqkv[base + j * hd..base + (j + 1) * hd]
                        .copy_from_slice(&dj[i * hd..(i + 1) * hd]);
                }
            }
        }
        Ok((
            Some(Tensor::from_vec(dqkv, qkv.shape(), qkv.device())?),
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt_neox::attention_bias;
    use candle_core::{Device, Var, D};
    use rand::{Rng, SeedableRng};

    /// The same attention from candle's composed ops (rope_slow, softmax), as the whole-sequence
    /// path computes it off the CPU.
    fn composed(qkv: &Tensor, bias: &Tensor, op: &CausalAttentionOp) -> Tensor {
        let (b, t, nh, hd) = (op.batch, op.seq, op.heads, op.head_dim);
        let rd = op.rotary.dims;
        let x = qkv
            .reshape((b, t, nh, 3 * hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let half = rd / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in 0..t {
            op.rotary.cos_sin(p, &mut cos, &mut sin);
        }
        let cos = Tensor::from_vec(cos, (t, half), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(sin, (t, half), &Device::Cpu).unwrap();
        let rot = |z: Tensor| {
            let r = candle_nn::rotary_emb::rope_slow(
                &z.narrow(3, 0, rd).unwrap().contiguous().unwrap(),
                &cos,
                &sin,
            )
            .unwrap();
            Tensor::cat(&[&r, &z.narrow(3, rd, hd - rd).unwrap()], 3)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let q = rot(x.narrow(3, 0, hd).unwrap());
        let k = rot(x.narrow(3, hd, hd).unwrap());
        let v = x.narrow(3, 2 * hd, hd).unwrap().contiguous().unwrap();
        let s = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let p = candle_nn::ops::softmax(&s.broadcast_add(bias).unwrap(), D::Minus1).unwrap();
        p.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b * t, nh * hd))
            .unwrap()
    }

    #[test]
    fn fused_attention_matches_the_composed_ops_forward_and_backward() {
        let (b, t, nh, hd, rd) = (2, 7, 3, 8, 4);
        let op = CausalAttentionOp {
            batch: b,
            seq: t,
            heads: nh,
            head_dim: hd,
            rotary: Arc::new(Rotary::new(rd, 10000.0, 16)),
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut v = |n: usize| {
            (0..n)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect::<Vec<_>>()
        };
        let dev = Device::Cpu;
        let qkv = Var::from_vec(v(b * t * 3 * nh * hd), (b * t, 3 * nh * hd), &dev).unwrap();
        // Row 1 has two padding positions at the start.
        let mask = Tensor::from_vec(
            (0..b * t)
                .map(|i| if i >= t && i < t + 2 { 0f32 } else { 1.0 })
                .collect::<Vec<_>>(),
            (b, t),
            &dev,
        )
        .unwrap();
        let bias = attention_bias(b, t, Some(&mask), &dev).unwrap();
        let r = Tensor::from_vec(v(b * t * nh * hd), (b * t, nh * hd), &dev).unwrap();
        let fused = qkv.apply_op2(&bias, op_clone(&op)).unwrap();
        let reference = composed(&qkv, &bias, &op);
        let gf = (&fused * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gr = (&reference * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let close = |a: &Tensor, c: &Tensor, what: &str| {
            let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let c: Vec<f32> = c.flatten_all().unwrap().to_vec1().unwrap();
            for (x, y) in a.iter().zip(&c) {
                assert!((x - y).abs() < 1e-4, "{what}: {x} vs {y}");
            }
        };
        close(&fused, &reference, "output");
        close(gf.get(&qkv).unwrap(), gr.get(&qkv).unwrap(), "d qkv");
    }

    fn op_clone(op: &CausalAttentionOp) -> CausalAttentionOp {
        CausalAttentionOp {
            rotary: op.rotary.clone(),
            ..*op
        }
    }
}
