//! Token selection: greedy, or sampling with temperature, top-k and top-p from a per-request
//! seeded generator (so a request's output never depends on the rest of the batch).

use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};

/// Sampling knobs of one request. `temperature == 0` means greedy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::input(
                "temperature",
                format!(
                    "{} (expected a finite number >= 0; 0 = greedy)",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::input(
                "top_p",
                format!("{} (expected 0 < top_p <= 1)", self.top_p),
            ));
        }
        Ok(())
    }
}

/// Picks tokens for one request.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub params: SamplingParams,
    rng: rand_chacha::ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(params.seed),
        }
    }

    /// Chooses the next token from raw logits.
    /// Temperature 0: the argmax, no randomness.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, x * inv_t))
            .collect();
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = self.params.top_k;
        if k > 0 && k < cand.len() {
            cand.select_nth_unstable_by(k - 1, by_logit_desc);
            cand.truncate(k);
        }
        cand.sort_unstable_by(by_logit_desc);
        let m = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - m).exp()).collect();
        let z: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut u = self.rng.random::<f32>() * total;
        for (c, p) in cand.iter().zip(&probs) {
            if u < *p {
                return c.0;
            }
            u -= p;
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the first maximum (as `torch.argmax`).
pub fn argmax(xs: &[f32]) -> u32 {
    // The maximum vectorized, then the first index holding it: the same answer as the scalar
    // scan (first maximum, NaN never wins), at memory speed.
    let m = crate::kernels::ops::max_value(xs);
    xs.iter().position(|&x| x == m).unwrap_or(0) as u32
}

/// Reference twin of [`argmax`]: the plain scan.
pub fn argmax_reference(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// `log_softmax(logits)[token]` and the `n` most likely tokens with their log-probabilities.
pub fn logprobs(logits: &[f32], token: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + logits.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
    (logits[token as usize] - lse, top_n(logits, n, lse))
}

/// Like [`logprobs`] for a row that already holds log-probabilities.
pub fn logprobs_from_logprobs(logp: &[f32], token: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    (logp[token as usize], top_n(logp, n, 0.0))
}

fn top_n(x: &[f32], n: usize, shift: f32) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..x.len() as u32).collect();
    let n = n.min(idx.len());
    idx.select_nth_unstable_by(n - 1, |&a, &b| x[b as usize].total_cmp(&x[a as usize]));
    idx.truncate(n);
    idx.sort_by(|&a, &b| x[b as usize].total_cmp(&x[a as usize]).then(a.cmp(&b)));
    idx.into_iter()
        .map(|i| (i, x[i as usize] - shift))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_argmax_matches_the_scan() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for n in [1, 5, 16, 17, 100, 50304] {
            let mut xs: Vec<f32> = (0..n).map(|_| rng.random_range(-5.0..5.0)).collect();
            assert_eq!(argmax(&xs), argmax_reference(&xs), "n {n}");
            // Ties go to the first maximum.
            xs[n / 2] = 9.0;
            xs[n - 1] = 9.0;
            assert_eq!(argmax(&xs), argmax_reference(&xs), "n {n} with ties");
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
    }

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect()
    }

    #[test]
    fn greedy_is_argmax_first_max() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(Sampler::new(SamplingParams::greedy()).sample(&logits()), 27);
        // 27 * 37 = 999
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 7,
        };
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..50).map(|_| s.sample(&logits())).collect::<Vec<_>>()
        };
        assert_eq!(draw(p), draw(p));
        assert_ne!(draw(p), draw(SamplingParams { seed: 8, ..p }));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let l = logits();
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
            seed: 1,
        });
        let mut top3: Vec<u32> = (0..100u32).collect();
        top3.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
        top3.truncate(3);
        for _ in 0..200 {
            assert!(top3.contains(&s.sample(&l)));
        }
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1e-6,
            seed: 1,
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&l), argmax(&l));
        }
    }

    #[test]
    fn bad_params_are_rejected() {
        let e = SamplingParams {
            temperature: -1.0,
            ..SamplingParams::greedy()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("temperature"));
        let e = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::greedy()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("top_p"));
    }

    #[test]
    fn logprobs_are_normalised() {
        let l = logits();
        let (lp, top) = logprobs(&l, 27, 5);
        assert_eq!(top[0].0, 27);
        assert!((top[0].1 - lp).abs() < 1e-6);
        let total: f32 = l
            .iter()
            .map(|&x| (logprobs(&l, 0, 0).0 - l[0] + x).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-4);
    }
}
