//! Throughput benchmark of batched generation, the paper's way (spec section 12): uniformly
//! random prompts of one length, greedy, no early stop, a warm-up run then timed runs, and
//! throughput = generated tokens / wall time of the whole run (prefill included).
//!
//! - [`bench_model`] runs one model at one batch size and lengths and returns a [`BenchRow`]
//!   (throughput, time split, peak resident memory, KV-cache bytes, roofline bound).
//! - [`roofline`]: the machine probe and the FLOP/byte model behind the bound.
//! - [`report`]: the table and JSON; [`chart`]: the SVG chart of throughput against batch size.
//!
//! `blockformer bench` (src/cli/bench.rs) is the command-line front end; `docs/bench.md`
//! describes the method and the cost model.

pub mod chart;
pub mod report;
pub mod roofline;

use crate::error::{Error, Result};
use crate::generate::{Engine, EngineOptions, EngineStats, GenRequest, PositionMode};
use crate::kernels::attention::KvDtype;
use crate::model::Model;
use rand::{Rng, SeedableRng};
use roofline::{
    cost_typed, screen_lm_head, BandwidthMeter, BandwidthSample, Machine, MemoryModel, Roofline,
    Workload,
};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// The paper's two settings, or other lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// Prompt 2048, 128 new tokens.
    PrefillHeavy,
    /// Prompt 128, 2048 new tokens.
    DecodeHeavy,
    Custom {
        prompt_len: usize,
        new_tokens: usize,
    },
}

impl Setting {
    pub fn name(&self) -> String {
        match self {
            Setting::PrefillHeavy => "prefill-heavy".into(),
            Setting::DecodeHeavy => "decode-heavy".into(),
            Setting::Custom {
                prompt_len,
                new_tokens,
            } => format!("{prompt_len}+{new_tokens}"),
        }
    }

    /// The paper setting with these lengths, else a custom one.
    pub fn of(prompt_len: usize, new_tokens: usize) -> Setting {
        match (prompt_len, new_tokens) {
            (2048, 128) => Setting::PrefillHeavy,
            (128, 2048) => Setting::DecodeHeavy,
            _ => Setting::Custom {
                prompt_len,
                new_tokens,
            },
        }
    }

    /// (prompt tokens, new tokens).
    pub fn lengths(&self) -> (usize, usize) {
        match *self {
            Setting::PrefillHeavy => (2048, 128),
            Setting::DecodeHeavy => (128, 2048),
            Setting::Custom {
                prompt_len,
                new_tokens,
            } => (prompt_len, new_tokens),
        }
    }
}

/// How each measurement is taken.
#[derive(Clone, Copy, Debug)]
pub struct BenchSpec {
    /// Timed runs (at least 1).
    pub runs: usize,
    /// Further timed runs until the timed runs add up to this many seconds (0: exactly
    /// `runs`): short measurements then take the median of many runs, long ones of `runs`.
    pub min_seconds: f64,
    /// Untimed runs first.
    pub warmup: usize,
    /// Seed of the random prompts.
    pub seed: u64,
    /// Wait for the device at each boundary of the time split ([`Engine::set_sync_split`]).
    pub sync_split: bool,
    /// Element type of the long-lived KV caches on the host path.
    pub kv_dtype: KvDtype,
    /// Read this machine's bandwidth around each CPU measurement and compare it with the
    /// machine's ([`BandwidthCheck`]): only meaningful when that is this machine's probe, not
    /// a bandwidth given for another machine.
    pub check_bandwidth: bool,
    /// Measure again, at most this many times, when the bandwidth check says the machine's
    /// bandwidth moved away from the probe's during a measurement; each repeat's bound uses
    /// the bandwidth measured just before it.
    pub unsteady_retries: usize,
    /// Read the bandwidth between the engine steps of each timed run, every this many seconds
    /// (0: never), with the clock stopped; the bound then takes each step's bandwidth from
    /// these readings instead of the probe's ([`Roofline::bound_sampled`]). CPU runs with a
    /// probe of this machine only; the check around the measurement is then left out.
    pub sample_every: f64,
}

impl Default for BenchSpec {
    fn default() -> Self {
        BenchSpec {
            runs: 3,
            min_seconds: 0.0,
            warmup: 1,
            seed: 0,
            sync_split: false,
            kv_dtype: KvDtype::F32,
            check_bandwidth: true,
            unsteady_retries: 0,
            sample_every: 0.0,
        }
    }
}

/// One timed run.
#[derive(Clone, Debug, Serialize)]
pub struct RunMeasure {
    /// Wall time of the run, the bandwidth readings taken during it left out.
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub stats: EngineStats,
    /// Bandwidth read before, during and after the run (`BenchSpec::sample_every`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bandwidth: Vec<BandwidthSample>,
}

/// Memory of a measurement (bytes).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct MemoryReport {
    /// Peak resident set (VmHWM) over the measurement's runs.
    pub peak_rss: usize,
    /// Whether the peak was reset before the measurement (`/proc/self/clear_refs`); if not,
    /// `peak_rss` is the process's peak so far.
    pub peak_reset: bool,
    /// Resident memory of the process before the model was loaded.
    pub base_rss: usize,
    /// Bytes of the model's parameters (`Model::params`).
    pub weights: usize,
    /// Resident memory the model added when loaded (measured; 0 if unknown). More than
    /// `weights` when modules hold copies of parameters in another layout.
    pub model_rss: usize,
    /// KV caches of all rows at their largest, as the engine reported them.
    pub kv_cache: usize,
    /// Largest step's activations (the memory model's estimate), all rows.
    pub activations: usize,
    /// Buffers of the bandwidth readings taken during the runs (`BenchSpec::sample_every`),
    /// held through them.
    pub sampler: usize,
    /// `base_rss + weights + kv_cache + activations + sampler`.
    pub expected: usize,
    /// GPU runs: the most device memory in use at the end of a step (driver's total - free,
    /// the CUDA context included).
    pub device_peak: Option<usize>,
    /// `peak_rss / expected` (GPU: `device_peak / expected`).
    pub ratio: f64,
}

/// One model at one batch size and lengths.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub model: String,
    /// Whether greedy decoding's LM head ran through its bfloat16 screen (the bound then
    /// counts it as bfloat16 work, [`roofline::screen_lm_head`]).
    pub lm_head_screened: bool,
    pub setting: String,
    pub batch: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    /// Median timed run (the faster of the two middle ones for an even count).
    pub tokens_per_s: f64,
    /// Wall time per generated token of one sequence (run time / new tokens), median run.
    pub ms_per_token: f64,
    pub seconds: f64,
    /// Slowest and fastest timed run, tokens/s.
    pub tokens_per_s_min: f64,
    pub tokens_per_s_max: f64,
    /// Time split of the median run.
    pub stats: EngineStats,
    pub runs: Vec<RunMeasure>,
    /// KV-cache bytes per sample, as the engine allocated them.
    pub kv_bytes_per_sample: usize,
    /// Bytes per element of the long-lived KV caches (4: float32, 2: float16 or bfloat16).
    pub kv_elem_bytes: usize,
    pub memory: MemoryReport,
    /// Roofline bound on this machine, if probed.
    pub bound: Option<Roofline>,
    /// `tokens_per_s / bound.tokens_per_s`.
    pub efficiency: Option<f64>,
    /// Against the stricter per-kernel bound (`bound.kernel_seconds`: no overlap of one
    /// kernel's arithmetic with another's memory traffic). Far above `efficiency` when the
    /// time lost is the overlap the bound allows, not slow kernels.
    pub kernel_efficiency: Option<f64>,
    /// Memory bandwidth read just before the warm-up and just after the timed runs (CPU runs
    /// with a probe).
    pub bandwidth_check: Option<BandwidthCheck>,
    /// Earlier measurements of this row that were repeated because the machine's bandwidth
    /// moved during them (`BenchSpec::unsteady_retries`), oldest first.
    pub discarded: Vec<Discarded>,
    /// The bandwidth readings the bound of the median run used (`BenchSpec::sample_every`).
    pub sampled_bandwidth: Option<SampledBandwidth>,
    /// The machine probe taken just before this measurement, when each measurement takes its
    /// own (`bench --reprobe-each`); otherwise the report's one probe applies.
    pub probe: Option<Machine>,
}

/// The range of the bandwidth readings taken during a run (bytes / s).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SampledBandwidth {
    pub every_s: f64,
    pub readings: usize,
    pub min: f64,
    pub mean: f64,
    pub max: f64,
}

impl SampledBandwidth {
    fn of(samples: &[BandwidthSample], every_s: f64) -> Option<SampledBandwidth> {
        let n = samples.len();
        let bw = samples.iter().map(|s| s.bandwidth);
        (n > 0).then(|| SampledBandwidth {
            every_s,
            readings: n,
            min: bw.clone().fold(f64::INFINITY, f64::min),
            mean: bw.clone().sum::<f64>() / n as f64,
            max: bw.fold(0.0, f64::max),
        })
    }
}

/// A measurement repeated because the machine was not steady during it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Discarded {
    pub tokens_per_s: f64,
    pub efficiency: Option<f64>,
    /// The check that found the machine's bandwidth moved.
    pub bandwidth_check: BandwidthCheck,
}

/// The probe's bandwidth against the machine's around one measurement (bytes / s).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct BandwidthCheck {
    pub probe: f64,
    pub before: f64,
    pub after: f64,
}

impl BandwidthCheck {
    /// Largest relative departure of `before` or `after` from the probe.
    pub fn drift(&self) -> f64 {
        let rel = |x: f64| (x / self.probe - 1.0).abs();
        rel(self.before).max(rel(self.after))
    }

    /// Whether the machine's bandwidth moved by more than [`BANDWIDTH_DRIFT`] from its probe,
    /// so that the efficiency against the probe is not to be trusted.
    pub fn moved(&self) -> bool {
        self.probe > 0.0 && self.drift() > BANDWIDTH_DRIFT
    }
}

/// See [`BandwidthCheck::moved`].
pub const BANDWIDTH_DRIFT: f64 = 0.15;

/// Resident memory figures of this process from `/proc/self/status` (bytes): (VmRSS, VmHWM).
pub fn rss() -> (usize, usize) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Returns freed heap memory to the system (glibc `malloc_trim`), so that memory a previous
/// measurement freed does not count in the next one's resident set.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resets the peak resident set to the current one (Linux `clear_refs` 5).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `MemAvailable` from `/proc/meminfo` (bytes).
pub fn mem_available() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let l = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    l.split_whitespace()
        .nth(1)?
        .parse::<usize>()
        .ok()
        .map(|kb| kb * 1024)
}

/// Memory a run on `dev` can still take (bytes): the GPU's free memory, else the host's
/// `MemAvailable`; `None` where neither can be read.
pub fn memory_left(dev: &candle_core::Device) -> Option<usize> {
    device_memory(dev)
        .map(|(free, _)| free)
        .or_else(mem_available)
}

/// Free and total memory of a GPU (bytes) from the driver; `None` on the CPU.
pub fn device_memory(dev: &candle_core::Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = dev {
        return d.cuda_stream().context().mem_get_info().ok();
    }
    let _ = dev;
    None
}

/// The GPU's name from the driver; `None` on the CPU.
pub fn device_name(dev: &candle_core::Device) -> Option<String> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = dev {
        return d.cuda_stream().context().name().ok();
    }
    let _ = dev;
    None
}

/// Bytes of the parameters a model holds (and of its quantized and packed copies).
pub fn weight_bytes(model: &Model) -> usize {
    model
        .params
        .iter()
        .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
        .sum::<usize>()
        + model.quantized_bytes()
        + model.packed_bytes()
}

/// Bytes per element of the long-lived KV caches of `model` run with `kv`: the host path
/// stores them as `kv` says; the tensor (GPU) path keeps them in the model's dtype.
pub fn kv_elem_bytes(model: &Model, kv: KvDtype) -> usize {
    match kv {
        KvDtype::F16 if model.device().is_cpu() => 2,
        _ => model.dtype().size_in_bytes(),
    }
}

/// The roofline bound of a run of `model` on `m`, at the element sizes it holds: weights in
/// its dtype, the decoder layers and LM head as stored (e.g. `q8_0`), the long-lived caches as
/// `kv` says.
pub fn roofline_bound(model: &Model, w: &Workload, m: &Machine, kv: KvDtype) -> Roofline {
    roofline_bound_sampled(model, w, m, kv, &[])
}

/// [`roofline_bound`] with each engine step's bandwidth taken from readings during the run
/// (the machine's where there are none).
pub fn roofline_bound_sampled(
    model: &Model,
    w: &Workload,
    m: &Machine,
    kv: KvDtype,
    samples: &[BandwidthSample],
) -> Roofline {
    let elems = (
        model.dtype().size_in_bytes() as f64,
        model.linear_bytes_per_weight(),
        kv_elem_bytes(model, kv) as f64,
    );
    let mut kernels = cost_typed(&model.config, w, elems.0, elems.1, elems.2);
    if model.lm_head_screened() {
        screen_lm_head(&mut kernels, &model.config, elems.1);
    }
    Roofline::of_kernels(&kernels, w, m, samples)
}

/// The memory model of a run of `model` at these lengths with caches `kv`, with the weights it
/// actually holds. Activations take the model's element size (the GPU path keeps them in the
/// model's dtype).
pub fn memory_model(
    model: &Model,
    prompt_len: usize,
    new_tokens: usize,
    kv: KvDtype,
) -> MemoryModel {
    let elem = model.dtype().size_in_bytes();
    let f_kv = kv_elem_bytes(model, kv);
    let mut mm = MemoryModel {
        weights: weight_bytes(model),
        ..MemoryModel::with_elems(&model.config, prompt_len, new_tokens, elem, f_kv)
    };
    if !model.device().is_cpu() {
        // The tensor path runs op by op: its temporaries outlive the host path's reused
        // buffers (an allowance of twice those buffers, until a GPU run measures it).
        mm.activations_per_sample *= 2;
        mm.rows_per_group = usize::MAX; // and it has no prefill groups
    }
    mm
}

/// Checks that a model can run these lengths.
pub fn check_lengths(model: &Model, prompt_len: usize, new_tokens: usize) -> Result<()> {
    if prompt_len == 0 {
        return Err(Error::input("--prompt-len", "must be at least 1"));
    }
    if new_tokens == 0 {
        return Err(Error::input("--new-tokens", "must be at least 1"));
    }
    let ctx = model.config.context_length();
    if prompt_len > ctx {
        return Err(Error::input(
            "--prompt-len",
            format!("{prompt_len} tokens is longer than the model's context of {ctx} tokens"),
        ));
    }
    Ok(())
}

/// Uniformly random prompts (seeded): `batch` rows of `len` ids below `vocab`.
pub fn random_prompts(batch: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..batch)
        .map(|_| {
            (0..len)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect()
        })
        .collect()
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// Wall time, the bandwidth readings left out.
    pub seconds: f64,
    /// Bandwidth readings: before the first step, every `Sampler::every` seconds between
    /// steps, after the last (none without a sampler).
    pub bandwidth: Vec<BandwidthSample>,
    pub stats: EngineStats,
    /// Largest KV-cache bytes the engine held.
    pub kv_bytes: usize,
    /// GPU: the most device memory in use at the end of a step (driver's total - free).
    pub device_used: Option<usize>,
}

/// The engine every run of a benchmark shares, like a server's: rows of later runs reuse the
/// caches of earlier ones.
pub fn bench_engine(model: &Arc<Model>, w: &Workload, kv: KvDtype) -> Engine {
    Engine::new(
        model.clone(),
        EngineOptions {
            positions: PositionMode::Trained,
            max_batch: w.batch,
            max_context: Some(w.prompt_len + w.new_tokens),
            kv_dtype: kv,
            ..Default::default()
        },
    )
}

/// Reads the machine's bandwidth between the steps of a run, as the probe does, every `every`
/// seconds of the run.
pub struct Sampler {
    pub meter: BandwidthMeter,
    pub every: f64,
}

impl Sampler {
    /// Best of 3, like the check around a measurement.
    fn read(&mut self, step: usize) -> BandwidthSample {
        BandwidthSample {
            step,
            bandwidth: self.meter.bandwidth(3),
        }
    }
}

/// One run on `eng`: `batch` prompts, greedy to the end. On a GPU the clock stops after the
/// device has finished its work. With a sampler, the bandwidth is read before the run, after
/// it, and between steps once `every` seconds have passed since the last reading; the clock
/// stops while it reads.
pub fn run_once(
    eng: &mut Engine,
    w: &Workload,
    seed: u64,
    mut sampler: Option<&mut Sampler>,
) -> Result<RunOutcome> {
    let model = eng.model().clone();
    let prompts = random_prompts(w.batch, w.prompt_len, model.config.vocab_size(), seed);
    let dev = model.device();
    eng.reset_stats();
    dev.synchronize()?;
    let mut bandwidth = Vec::new();
    if let Some(s) = sampler.as_deref_mut() {
        bandwidth.push(s.read(0));
    }
    let start = Instant::now();
    let mut paused = 0.0;
    let mut last_reading = start;
    for p in prompts {
        eng.add(GenRequest::greedy(p, w.new_tokens))?;
    }
    let mut kv = 0;
    let mut produced = 0;
    let mut steps = 0;
    let mut device_used: Option<usize> = None;
    while !eng.is_idle() {
        let events = eng.step()?;
        steps += 1;
        kv = kv.max(eng.kv_cache_bytes());
        produced += events.iter().map(|e| e.tokens.len()).sum::<usize>();
        if let Some((free, total)) = device_memory(&dev) {
            device_used = Some(device_used.unwrap_or(0).max(total - free));
        }
        if let Some(s) = sampler.as_deref_mut() {
            if last_reading.elapsed().as_secs_f64() >= s.every && !eng.is_idle() {
                let t = Instant::now();
                bandwidth.push(s.read(steps));
                paused += t.elapsed().as_secs_f64();
                last_reading = Instant::now();
            }
        }
    }
    dev.synchronize()?;
    let secs = start.elapsed().as_secs_f64() - paused;
    if let Some(s) = sampler {
        bandwidth.push(s.read(steps));
    }
    if produced != w.batch * w.new_tokens {
        return Err(Error::input(
            "bench",
            format!(
                "the engine produced {produced} tokens, expected {} x {}",
                w.batch, w.new_tokens
            ),
        ));
    }
    Ok(RunOutcome {
        seconds: secs,
        bandwidth,
        stats: eng.stats(),
        kv_bytes: kv,
        device_used,
    })
}

/// Benchmarks `model` on workload `w` (its setting named by [`Setting::of`]): `spec.warmup`
/// untimed runs, then `spec.runs` timed ones; the roofline bound when a probed machine is
/// given. `rss_load` is the process's resident memory before and after the model was loaded
/// (for the expected memory; zeros if unknown). A measurement during which the machine's
/// bandwidth moved ([`BandwidthCheck::moved`]) is repeated up to `spec.unsteady_retries`
/// times, against the bandwidth measured again; the row keeps the last one and lists the
/// others in `discarded`.
pub fn bench_model(
    model: &Arc<Model>,
    name: &str,
    w: Workload,
    spec: &BenchSpec,
    machine: Option<&Machine>,
    rss_load: (usize, usize),
    mut progress: impl FnMut(&str),
) -> Result<BenchRow> {
    let mut machine = machine.cloned();
    let mut discarded = Vec::new();
    loop {
        let mut row = measure(
            model,
            name,
            w,
            spec,
            machine.as_ref(),
            rss_load,
            &mut progress,
        )?;
        // A check exists only on a probed machine.
        let retry = row
            .bandwidth_check
            .filter(|c| c.moved() && discarded.len() < spec.unsteady_retries);
        let Some(c) = retry else {
            row.discarded = discarded;
            return Ok(row);
        };
        discarded.push(Discarded {
            tokens_per_s: row.tokens_per_s,
            efficiency: row.efficiency,
            bandwidth_check: c,
        });
        progress(&format!(
            "{name} {} batch {}: bandwidth {:.1} GB/s before and {:.1} after, the probe's {:.1}: measuring again ({}/{})",
            row.setting,
            w.batch,
            c.before / 1e9,
            c.after / 1e9,
            c.probe / 1e9,
            discarded.len(),
            spec.unsteady_retries
        ));
        machine = machine.map(|m| m.with_bandwidth_now());
    }
}

/// One measurement of [`bench_model`].
fn measure(
    model: &Arc<Model>,
    name: &str,
    w: Workload,
    spec: &BenchSpec,
    machine: Option<&Machine>,
    rss_load: (usize, usize),
    mut progress: impl FnMut(&str),
) -> Result<BenchRow> {
    if w.batch == 0 {
        return Err(Error::input("--batch-size", "must be at least 1"));
    }
    check_lengths(model, w.prompt_len, w.new_tokens)?;
    let setting = Setting::of(w.prompt_len, w.new_tokens).name();
    // The bandwidth check allocates two probe buffers: before the peak is reset, after it
    // is read.
    let checked = machine.filter(|_| spec.check_bandwidth && model.device().is_cpu());
    // Readings during the runs replace the check around them; the sampler's buffers are
    // allocated before the peak is reset, and counted.
    let mut sampler = checked
        .filter(|_| spec.sample_every > 0.0)
        .map(|m| Sampler {
            meter: BandwidthMeter::new(m.buffer_mib),
            every: spec.sample_every,
        });
    let sampler_bytes = sampler.as_ref().map_or(0, |s| s.meter.bytes());
    let checked = checked.filter(|_| sampler.is_none());
    let bandwidth_before = checked.map(|m| m.bandwidth_now());
    // An earlier measurement's activation buffers (a longer prompt's) are not this one's.
    model.release_buffers();
    trim_heap();
    // On a GPU: what earlier measurements left in the allocator's pool goes back to the
    // driver, so the device memory read between steps is this measurement's.
    crate::gpu::trim_pool(&model.device())?;
    let peak_reset = reset_peak_rss();
    let mut kv_max = 0;
    let mut device_peak: Option<usize> = None;
    let mut eng = bench_engine(model, &w, spec.kv_dtype);
    eng.set_sync_split(spec.sync_split);
    for i in 0..spec.warmup {
        let t = Instant::now();
        let o = run_once(&mut eng, &w, spec.seed, None)?;
        kv_max = kv_max.max(o.kv_bytes);
        device_peak = device_peak.max(o.device_used);
        progress(&format!(
            "{name} {setting} batch {}: warm-up {}/{} {:.2} s",
            w.batch,
            i + 1,
            spec.warmup,
            t.elapsed().as_secs_f64()
        ));
    }
    // The device-time profile (BLOCKFORMER_PROFILE) covers the timed runs.
    crate::gpu::profile_reset();
    let mut runs = Vec::new();
    let mut timed = 0.0;
    let fixed_runs = spec.runs.max(1);
    while runs.len() < fixed_runs || timed < spec.min_seconds {
        let i = runs.len();
        let o = run_once(
            &mut eng,
            &w,
            spec.seed.wrapping_add(1 + i as u64),
            sampler.as_mut(),
        )?;
        let (secs, stats) = (o.seconds, o.stats);
        kv_max = kv_max.max(o.kv_bytes);
        device_peak = device_peak.max(o.device_used);
        timed += secs;
        let tps = (w.batch * w.new_tokens) as f64 / secs;
        let of = if i < fixed_runs {
            format!("/{fixed_runs}")
        } else {
            format!(" ({timed:.1} of {:.1} s)", spec.min_seconds)
        };
        progress(&format!(
            "{name} {setting} batch {}: run {}{of} {secs:.2} s, {tps:.1} tokens/s",
            w.batch,
            i + 1,
        ));
        runs.push(RunMeasure {
            seconds: secs,
            tokens_per_s: tps,
            stats,
            bandwidth: o.bandwidth,
        });
    }
    let (_, hwm) = rss();
    let bandwidth_check = checked
        .zip(bandwidth_before)
        .map(|(m, before)| BandwidthCheck {
            probe: m.bandwidth,
            before,
            after: m.bandwidth_now(),
        });
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| runs[a].seconds.total_cmp(&runs[b].seconds));
    let med = &runs[order[(order.len() - 1) / 2]];
    let mm = memory_model(model, w.prompt_len, w.new_tokens, spec.kv_dtype);
    if kv_max == 0 {
        kv_max = mm.kv_per_sample * w.batch;
    }
    let activations = mm.activations(w.batch);
    // On a GPU the measured peak is the device's memory in use (its CUDA context included);
    // on the CPU the process's resident set.
    let base_rss = if device_peak.is_some() { 0 } else { rss_load.0 };
    let expected = base_rss + mm.weights + kv_max + activations + sampler_bytes;
    let peak = device_peak.unwrap_or(hwm);
    let bound =
        machine.map(|m| roofline_bound_sampled(model, &w, m, spec.kv_dtype, &med.bandwidth));
    let efficiency = bound
        .filter(|b| b.tokens_per_s > 0.0)
        .map(|b| med.tokens_per_s / b.tokens_per_s);
    let kernel_efficiency = bound
        .filter(|b| b.kernel_seconds > 0.0)
        .map(|b| med.tokens_per_s * b.kernel_seconds / (w.batch * w.new_tokens) as f64);
    Ok(BenchRow {
        lm_head_screened: model.lm_head_screened(),
        kv_elem_bytes: kv_elem_bytes(model, spec.kv_dtype),
        model: name.to_string(),
        setting,
        batch: w.batch,
        prompt_len: w.prompt_len,
        new_tokens: w.new_tokens,
        tokens_per_s: med.tokens_per_s,
        ms_per_token: 1000.0 * med.seconds / w.new_tokens as f64,
        seconds: med.seconds,
        tokens_per_s_min: runs[order[order.len() - 1]].tokens_per_s,
        tokens_per_s_max: runs[order[0]].tokens_per_s,
        stats: med.stats,
        kv_bytes_per_sample: kv_max / w.batch,
        memory: MemoryReport {
            peak_rss: hwm,
            peak_reset,
            base_rss,
            weights: mm.weights,
            model_rss: rss_load.1.saturating_sub(rss_load.0),
            kv_cache: kv_max,
            activations,
            sampler: sampler_bytes,
            expected,
            device_peak,
            ratio: if expected > 0 {
                peak as f64 / expected as f64
            } else {
                0.0
            },
        },
        bound,
        efficiency,
        kernel_efficiency,
        bandwidth_check,
        discarded: Vec::new(),
        sampled_bandwidth: SampledBandwidth::of(&med.bandwidth, spec.sample_every),
        probe: None,
        runs,
    })
}

/// The largest batch (at most `max_batch`) whose weights, caches and activations plus
/// `overhead` fit in `budget` bytes, and a sentence saying why.
pub fn auto_batch(
    model: &Model,
    prompt_len: usize,
    new_tokens: usize,
    kv: KvDtype,
    budget: usize,
    overhead: usize,
    max_batch: usize,
) -> Result<(usize, String)> {
    let mm = memory_model(model, prompt_len, new_tokens, kv);
    let per = mm.kv_per_sample + mm.activations_per_sample;
    match mm.largest_batch(budget, overhead, max_batch) {
        Some(b) => {
            let capped = b == max_batch || (max_batch > 8 && b == max_batch / 8 * 8);
            let why = format!(
                "batch {b}: {} weights + {} process + {b} x {} per sample (KV {} + activations {}) = {} of the {} budget{}",
                report::bytes(mm.weights),
                report::bytes(overhead),
                report::bytes(per),
                report::bytes(mm.kv_per_sample),
                report::bytes(mm.activations_per_sample),
                report::bytes(mm.total(b) + overhead),
                report::bytes(budget),
                if capped {
                    format!(" (capped by --max-batch {max_batch})")
                } else {
                    String::new()
                }
            );
            Ok((b, why))
        }
        None => Err(Error::input(
            "--memory-budget",
            format!(
                "{} does not fit even one row: weights {} + process {} + one row {}",
                report::bytes(budget),
                report::bytes(mm.weights),
                report::bytes(overhead),
                report::bytes(per)
            ),
        )),
    }
}

/// Refuses a given batch whose KV caches and activations (the weights are loaded already)
/// need more than the `available` bytes of memory left: such a run would swap or be killed by
/// the kernel part-way. The error names the largest batch that fits.
pub fn check_batch_fits(model: &Model, w: &Workload, kv: KvDtype, available: usize) -> Result<()> {
    let mm = memory_model(model, w.prompt_len, w.new_tokens, kv);
    let need = mm.beyond_weights(w.batch);
    if need.is_some_and(|n| n <= available) {
        return Ok(());
    }
    let need = match need {
        Some(n) => format!(
            "{} ({} x {} of KV caches + {} of activations)",
            report::bytes(n),
            w.batch,
            report::bytes(mm.kv_per_sample),
            report::bytes(mm.activations(w.batch))
        ),
        None => format!(
            "more than can be counted ({} of KV caches per row)",
            report::bytes(mm.kv_per_sample)
        ),
    };
    let fit = match mm.largest_batch(available + mm.weights, 0, w.batch) {
        Some(b) => format!("the largest batch that fits is {b}"),
        None => "not even one row fits".to_string(),
    };
    Err(Error::input(
        "--batch-size",
        format!(
            "batch {} at {}+{} needs {need} beyond the loaded weights, but only {} of memory \
             is available: {fit}",
            w.batch,
            w.prompt_len,
            w.new_tokens,
            report::bytes(available),
        ),
    ))
}

/// Throughput of model A over model B at each batch size both ran (and setting).
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub setting: String,
    pub batch_a: usize,
    pub batch_b: usize,
    pub tokens_per_s_a: f64,
    pub tokens_per_s_b: f64,
    /// A / B.
    pub ratio: f64,
}

/// Pairs A's and B's rows of the same setting: same batch sizes when both ran them, else
/// in order (e.g. each at its own auto-tuned batch).
pub fn ratios(a: &[BenchRow], b: &[BenchRow]) -> Vec<Ratio> {
    let mut out = Vec::new();
    let mut settings: Vec<&str> = a.iter().map(|r| r.setting.as_str()).collect();
    settings.dedup();
    for s in settings {
        let ra: Vec<&BenchRow> = a.iter().filter(|r| r.setting == s).collect();
        let rb: Vec<&BenchRow> = b.iter().filter(|r| r.setting == s).collect();
        let mut pairs: Vec<(&BenchRow, &BenchRow)> = ra
            .iter()
            .filter_map(|x| rb.iter().find(|y| y.batch == x.batch).map(|y| (*x, *y)))
            .collect();
        if pairs.is_empty() {
            pairs = ra.iter().copied().zip(rb.iter().copied()).collect();
        }
        for (x, y) in pairs {
            out.push(Ratio {
                setting: s.to_string(),
                batch_a: x.batch,
                batch_b: y.batch,
                tokens_per_s_a: x.tokens_per_s,
                tokens_per_s_b: y.tokens_per_s,
                ratio: x.tokens_per_s / y.tokens_per_s,
            });
        }
    }
    out
}

/// Everything a `bench` invocation measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub machine: Option<Machine>,
    pub threads: usize,
    pub runs: usize,
    /// Timed runs continued until they added up to this many seconds (`--min-time`).
    pub min_seconds: f64,
    pub warmup: usize,
    pub rows: Vec<BenchRow>,
    /// With `--compare A B`: A / B.
    pub compare: Option<(String, String)>,
    pub ratios: Vec<Ratio>,
    /// How batch sizes were chosen, lengths shortened, and the like.
    pub notes: Vec<String>,
}
