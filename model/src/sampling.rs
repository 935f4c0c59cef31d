//! Token sampling from logits: greedy, temperature, top-k, top-p, min-p, repetition /
//! presence / frequency penalties, and a seeded generator so a seed reproduces a run.
//!
//! The order follows llama.cpp's default chain: penalties → top-k → top-p → min-p →
//! temperature → draw. Greedy (temperature ≤ 0) takes the first maximal logit, as llama.cpp's
//! greedy sampler does. Sampling runs where the logits are (the last pipeline stage), so only
//! the chosen id and optional log-probabilities travel.

use std::collections::HashMap;

/// Sampling parameters of one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// ≤ 0 means greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables (llama.cpp `--repeat-penalty`).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: usize,
    /// OpenAI-style additive penalties (0.0 disables).
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// `None` seeds from the clock.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding, no penalties.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }

    /// Checks ranges; the message names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature > 100.0 {
            return Err(format!("temperature {} must be between 0 and 100", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p {} must be in [0, 1]", self.min_p));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(format!("repeat_penalty {} must be positive", self.repeat_penalty));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} {v} must be between -2 and 2"));
            }
        }
        Ok(())
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, reproducible across platforms.
#[derive(Clone, Debug)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e3779b97f4a7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Samples tokens for one sequence; keeps its generator and recent-token history.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    history: Vec<u32>,
    /// Candidate buffer reused across calls.
    cand: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed)
        });
        Sampler { params, rng: Rng::new(seed), history: Vec::new(), cand: Vec::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records tokens that count for the penalties (the prompt, then each sampled token).
    pub fn accept(&mut self, tokens: &[u32]) {
        self.history.extend_from_slice(tokens);
    }

    /// Advances the generator past `n` draws. A sample at temperature > 0 makes exactly one
    /// draw (greedy makes none), so a sequence restarted elsewhere after `k` such samples
    /// (with its history given to [`Sampler::accept`]) continues with the same tokens a
    /// sampler that never stopped would pick.
    pub fn skip_draws(&mut self, n: u64) {
        for _ in 0..n {
            self.rng.next_u64();
        }
    }

    /// Picks the next token from `logits` (one row of the vocabulary) and records it.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let id = self.pick(logits);
        self.history.push(id);
        id
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let penalized = p.repeat_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        let mut adjusted;
        let logits = if penalized {
            adjusted = logits.to_vec();
            let start = self.history.len().saturating_sub(p.repeat_last_n);
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &t in &self.history[start..] {
                *counts.entry(t).or_default() += 1;
            }
            for (&t, &n) in &counts {
                let Some(l) = adjusted.get_mut(t as usize) else { continue };
                // llama.cpp: divide positive logits, multiply negative ones.
                if *l > 0.0 {
                    *l /= p.repeat_penalty;
                } else {
                    *l *= p.repeat_penalty;
                }
                *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
            }
            &adjusted[..]
        } else {
            logits
        };

        if p.temperature <= 0.0 {
            return argmax(logits);
        }

        let cand = &mut self.cand;
        cand.clear();
        cand.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_logit);
        // Probabilities at temperature 1 for top-p / min-p, as llama.cpp computes them.
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = cand.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, &pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            keep = keep.min(probs.iter().take_while(|&&pr| pr >= floor).count().max(1));
        }
        cand.truncate(keep);
        // Temperature, then draw.
        let max = cand[0].1 / p.temperature;
        let weights: Vec<f64> = cand.iter().map(|c| ((c.1 / p.temperature - max) as f64).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (c, w) in cand.iter().zip(&weights) {
            if r < *w {
                return c.0;
            }
            r -= w;
        }
        cand[cand.len() - 1].0
    }
}

/// Index of the first maximal value.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-probability of `id` and the `top_n` most likely tokens, from raw logits.
pub fn logprobs(logits: &[f32], id: u32, top_n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
    let mut top: Vec<(u32, f32)> = Vec::new();
    if top_n > 0 {
        let mut all: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        let k = top_n.min(all.len());
        all.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        all.truncate(k);
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        top = all.into_iter().map(|(i, l)| (i, l - lse)).collect();
    }
    let lp = logits.get(id as usize).map_or(f32::NEG_INFINITY, |l| l - lse);
    (lp, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.0, 3.0, 1.0, 3.0]), 1);
    }

    #[test]
    fn a_restarted_sampler_continues_the_same_stream() {
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, repeat_penalty: 1.3, seed: Some(11), ..Default::default() };
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let mut whole = Sampler::new(p.clone());
        whole.accept(&[1, 2, 3]);
        let all: Vec<u32> = (0..12).map(|_| whole.sample(&logits)).collect();
        let mut again = Sampler::new(p);
        again.accept(&[1, 2, 3]);
        again.accept(&all[..7]);
        again.skip_draws(7);
        let rest: Vec<u32> = (0..5).map(|_| again.sample(&logits)).collect();
        assert_eq!(rest, all[7..]);
        assert!(all.iter().collect::<std::collections::HashSet<_>>().len() > 2, "the test logits should give varied tokens: {all:?}");
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let p = SamplingParams { temperature: 1.5, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(seed), ..Default::default() };
            let mut s = Sampler::new(p);
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let p = SamplingParams { temperature: 5.0, top_k: 1, seed: Some(1), ..Default::default() };
        let mut s = Sampler::new(p);
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.1, 0.2, 2.0, 0.3]), 2);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // p ≈ [0.84, 0.11, 0.04, ...]: top_p 0.5 keeps only the first.
        let logits = [4.0, 2.0, 1.0, -3.0];
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.5, min_p: 0.0, seed: Some(3), ..Default::default() };
        let mut s = Sampler::new(p);
        assert!((0..50).all(|_| s.sample(&logits) == 0));
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.2, seed: Some(3), ..Default::default() };
        let mut s = Sampler::new(p);
        assert!((0..200).all(|_| s.sample(&logits) <= 1));
    }

    #[test]
    fn repeat_penalty_moves_greedy_choice() {
        let p = SamplingParams { temperature: 0.0, repeat_penalty: 2.0, ..Default::default() };
        let mut s = Sampler::new(p);
        s.accept(&[0]);
        assert_eq!(s.sample(&[3.0, 2.0]), 1);
        let p = SamplingParams { temperature: 0.0, presence_penalty: 1.5, ..Default::default() };
        let mut s = Sampler::new(p);
        s.accept(&[0]);
        assert_eq!(s.sample(&[3.0, 2.0]), 1);
    }

    #[test]
    fn logprobs_are_normalized() {
        let logits = [1.0f32, 2.0, 3.0];
        let (lp, top) = logprobs(&logits, 2, 3);
        let total: f32 = top.iter().map(|t| t.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(top[0].0, 2);
        assert!((lp - top[0].1).abs() < 1e-7);
    }

    #[test]
    fn bad_params_are_named() {
        let p = SamplingParams { top_p: 0.0, ..Default::default() };
        assert!(p.validate().unwrap_err().contains("top_p"));
    }
}
