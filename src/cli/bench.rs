//! `blockformer bench`: the paper's throughput benchmark with a roofline bound.

use anyhow::{bail, Context};
use blockformer::bench::roofline::{default_cache_path, Machine, ProbeSource, Workload};
use blockformer::bench::{self, report, BenchReport, BenchSpec, Setting};
use blockformer::checkpoint;
use blockformer::config;
use blockformer::model::Model;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingArg {
    /// Prompt 2048, 128 new tokens.
    PrefillHeavy,
    /// Prompt 128, 2048 new tokens.
    DecodeHeavy,
    /// --prompt-len and --new-tokens.
    Custom,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Preset(s) with random weights (e.g. block_main_b4_85,vanilla_70); with --model, the
    /// architecture of that checkpoint.
    #[arg(long, value_delimiter = ',')]
    pub preset: Vec<String>,
    /// Model folder (config.json + model.safetensors) or .safetensors file.
    #[arg(long, conflicts_with = "compare")]
    pub model: Option<PathBuf>,
    /// Benchmark two models (each a preset name or a model folder) and print A/B throughput.
    #[arg(long, num_args = 2, value_names = ["A", "B"], conflicts_with = "preset")]
    pub compare: Vec<String>,
    /// Setting(s): prefill-heavy (2048+128), decode-heavy (128+2048), custom (--prompt-len,
    /// --new-tokens). Default: both paper settings, or custom when lengths are given.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub setting: Vec<SettingArg>,
    /// Prompt tokens per row (custom setting).
    #[arg(long)]
    pub prompt_len: Option<usize>,
    /// Generated tokens per row (custom setting).
    #[arg(long)]
    pub new_tokens: Option<usize>,
    /// Batch size(s), e.g. 1,8,64. Default: the largest batch that fits --memory-budget.
    #[arg(long, value_delimiter = ',', conflicts_with = "memory_budget")]
    pub batch_size: Vec<usize>,
    /// Memory for weights, KV caches and activations when auto-tuning the batch: 8GiB, 512MiB,
    /// bytes, or a share of available memory such as 60% (default).
    #[arg(long)]
    pub memory_budget: Option<String>,
    /// Upper limit of the auto-tuned batch.
    #[arg(long, default_value_t = 256)]
    pub max_batch: usize,
    /// Timed runs per measurement.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Keep timing runs past --runs until they add up to this many seconds, so that short
    /// measurements report the median of many runs (one hiccup of a shared machine then no
    /// longer decides a 0.4 s measurement).
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    pub min_time: f64,
    /// Untimed warm-up runs per measurement.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seed of the random weights (presets).
    #[arg(long, default_value_t = 0)]
    pub weights_seed: u64,
    /// Print the report as JSON (stdout) instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Write an SVG chart of throughput against batch size.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Measure the machine again instead of using the cached probe.
    #[arg(long)]
    pub reprobe: bool,
    /// Measure the machine again before every measurement (each model, setting and batch),
    /// each row's bound starting from its own probe: for a long matrix on a machine whose
    /// speed drifts. CPU only; implies --reprobe.
    #[arg(
        long,
        conflicts_with_all = ["no_roofline", "peak_gflops", "bandwidth_gbs", "dry_run"]
    )]
    pub reprobe_each: bool,
    /// When the machine's memory bandwidth moved more than 15% from the probe's during a
    /// measurement (read before and after it), measure again, at most this many times, each
    /// time against the bandwidth measured anew; the report lists what it discarded.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        conflicts_with_all = ["no_roofline", "bandwidth_gbs"]
    )]
    pub retry_unsteady: usize,
    /// Read the memory bandwidth between the steps of each timed run, every this many seconds
    /// (best of 3 reads and copies of the probe's buffer, the clock stopped), and bound each
    /// step by the bandwidth read around it instead of the probe's: for long runs on a
    /// machine whose bandwidth changes while they run. CPU only.
    #[arg(
        long,
        value_name = "SECONDS",
        conflicts_with_all = ["no_roofline", "bandwidth_gbs", "retry_unsteady"]
    )]
    pub sample_bandwidth: Option<f64>,
    /// Skip the roofline (no probe, no bound).
    #[arg(long, conflicts_with = "reprobe")]
    pub no_roofline: bool,
    /// Where the probe is cached (default $XDG_CACHE_HOME/blockformer/probe.json or
    /// ~/.cache/blockformer/probe.json).
    #[arg(long)]
    pub probe_cache: Option<PathBuf>,
    /// Override the probe's matmul speed (GFLOP/s), e.g. to compute another machine's bound.
    #[arg(long, conflicts_with = "no_roofline")]
    pub peak_gflops: Option<f64>,
    /// Override the probe's memory bandwidth (GB/s).
    #[arg(long, conflicts_with = "no_roofline")]
    pub bandwidth_gbs: Option<f64>,
    /// On a GPU: wait for the device at each boundary of the time split, so each part shows
    /// its device time (a little slower overall; without it the parts are launch times).
    #[arg(long)]
    pub sync_split: bool,
    /// Element type of the long-lived KV caches (block decoder, vanilla stack) on the CPU:
    /// f16 halves their memory and traffic (values rounded when stored, math in float32); the
    /// roofline counts 2 bytes per cached element. On a GPU the caches take --dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub kv_cache: super::generate::KvCacheType,
    /// Print the roofline bound and the memory model only; run nothing.
    #[arg(long, conflicts_with = "no_roofline")]
    pub dry_run: bool,
    /// Device, dtype, quantization. On a GPU the roofline uses --peak-gflops and
    /// --bandwidth-gbs, or the data-sheet numbers of a known GPU (H100, H200); with q8_0 it
    /// counts 8.5 bits per decoder-layer and LM-head weight.
    #[command(flatten)]
    pub run: super::common::RunArgs,
    /// Print only the report (no progress lines on stderr).
    #[arg(long, short)]
    pub quiet: bool,
}

/// A model to benchmark: a preset (random weights) or a checkpoint.
#[derive(Clone, Debug)]
enum Source {
    Preset(String),
    Checkpoint(PathBuf, Option<String>),
}

impl Source {
    fn parse(s: &str) -> anyhow::Result<Source> {
        let p = Path::new(s);
        if p.exists() {
            return Ok(Source::Checkpoint(p.to_path_buf(), None));
        }
        if config::PRESETS.contains(&s) {
            return Ok(Source::Preset(s.to_string()));
        }
        bail!(
            "--compare: `{s}` is neither a model folder nor a preset; presets: {}",
            config::PRESETS.join(", ")
        )
    }

    fn name(&self) -> String {
        match self {
            Source::Preset(p) => p.clone(),
            Source::Checkpoint(p, _) => {
                let p = if p.file_name().is_some_and(|f| f == "model.safetensors") {
                    p.parent().unwrap_or(p)
                } else {
                    p
                };
                p.file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_else(|| p.display().to_string())
            }
        }
    }

    fn load(
        &self,
        weights_seed: u64,
        run: &super::common::RunArgs,
        dev: &Device,
        dtype: DType,
    ) -> anyhow::Result<Model> {
        let m = match self {
            Source::Preset(p) => {
                let cfg = config::preset(p)?;
                Model::random(&cfg, weights_seed, dev)?
            }
            Source::Checkpoint(path, preset) => {
                checkpoint::load(path, preset.as_deref(), None, &Device::Cpu)?.model
            }
        };
        run.prepare(m, dev, dtype)
    }
}

fn settings(a: &Args) -> anyhow::Result<Vec<Setting>> {
    let lengths = a.prompt_len.is_some() || a.new_tokens.is_some();
    let mut chosen = a.setting.clone();
    if chosen.is_empty() {
        chosen = if lengths {
            vec![SettingArg::Custom]
        } else {
            vec![SettingArg::PrefillHeavy, SettingArg::DecodeHeavy]
        };
    }
    if lengths && !chosen.contains(&SettingArg::Custom) {
        bail!("--prompt-len and --new-tokens belong to --setting custom (the paper settings fix their lengths)");
    }
    let mut out = Vec::new();
    for s in chosen {
        out.push(match s {
            SettingArg::PrefillHeavy => Setting::PrefillHeavy,
            SettingArg::DecodeHeavy => Setting::DecodeHeavy,
            SettingArg::Custom => {
                let (Some(p), Some(g)) = (a.prompt_len, a.new_tokens) else {
                    bail!("--setting custom needs both --prompt-len and --new-tokens");
                };
                if p == 0 {
                    bail!("--prompt-len must be at least 1");
                }
                if g == 0 {
                    bail!("--new-tokens must be at least 1");
                }
                Setting::Custom {
                    prompt_len: p,
                    new_tokens: g,
                }
            }
        });
    }
    Ok(out)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    // Everything that can be checked without loading a model comes first.
    let sources: Vec<Source> = if !a.compare.is_empty() {
        a.compare
            .iter()
            .map(|s| Source::parse(s))
            .collect::<anyhow::Result<_>>()?
    } else if let Some(m) = &a.model {
        if a.preset.len() > 1 {
            bail!("--model takes at most one --preset (its architecture)");
        }
        vec![Source::Checkpoint(m.clone(), a.preset.first().cloned())]
    } else if !a.preset.is_empty() {
        for p in &a.preset {
            config::preset(p)?;
        }
        a.preset.iter().map(|p| Source::Preset(p.clone())).collect()
    } else {
        bail!("no model: give --preset NAME, --model DIR or --compare A B");
    };
    let settings = settings(&a)?;
    if let Some(b) = a.batch_size.iter().find(|&&b| b == 0) {
        bail!("--batch-size {b}: batch sizes must be at least 1");
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if !(a.min_time.is_finite() && (0.0..=86_400.0).contains(&a.min_time)) {
        bail!(
            "--min-time {}: expected seconds between 0 and 86400",
            a.min_time
        );
    }
    if a.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if let Some(s) = a.sample_bandwidth {
        if !(s.is_finite() && s > 0.0) {
            bail!("--sample-bandwidth {s}: expected a positive number of seconds");
        }
    }
    let (dev, dtype) = a.run.device_dtype(DType::BF16)?;
    if !dev.is_cpu() && a.sample_bandwidth.is_some() {
        bail!("--sample-bandwidth reads the host's memory bandwidth: it applies to CPU runs only");
    }
    if !dev.is_cpu() && a.kv_cache != super::generate::KvCacheType::F32 {
        bail!("--kv-cache f16: applies to the CPU's caches; on a GPU the KV caches take --dtype");
    }
    // GPU: the budget is a share of the device's free memory (default 90%), else of the host's
    // available memory (default 60%).
    let gpu_free = bench::device_memory(&dev).map(|(free, _)| free);
    let budget = if a.batch_size.is_empty() {
        let (avail, default) = match gpu_free {
            Some(f) => (Some(f), "90%"),
            None => (bench::mem_available(), "60%"),
        };
        let s = a.memory_budget.as_deref().unwrap_or(default);
        Some(report::parse_bytes(s, avail).map_err(|e| anyhow::anyhow!("--memory-budget {e}"))?)
    } else {
        None
    };
    if let Some(c) = &a.chart {
        if c.extension().is_none_or(|e| !e.eq_ignore_ascii_case("svg")) {
            bail!(
                "--chart {}: only SVG charts are written (name the file .svg)",
                c.display()
            );
        }
    }
    let quiet = a.quiet;
    let say = |m: &str| {
        if !quiet {
            eprintln!("{m}");
        }
    };

    let cache = a.probe_cache.clone().or_else(default_cache_path);
    let reprobe = a.reprobe || a.reprobe_each;
    let mut machine = if a.no_roofline {
        None
    } else {
        let gpu = bench::device_name(&dev).map(|name| {
            let sheet = Machine::gpu_data_sheet(&name);
            (name, sheet)
        });
        if let Some((name, None)) = &gpu {
            if a.peak_gflops.is_none() || a.bandwidth_gbs.is_none() {
                bail!("no data-sheet numbers for GPU `{name}`: give --peak-gflops and --bandwidth-gbs (or --no-roofline)");
            }
        }
        let given = (a.peak_gflops.is_some() && a.bandwidth_gbs.is_some()) || gpu.is_some();
        if gpu.is_some() && a.reprobe_each {
            bail!("--reprobe-each: a GPU's roofline uses its data-sheet numbers, there is nothing to probe (CPU only)");
        }
        if !given && (reprobe || cache.as_ref().is_none_or(|p| !p.exists())) {
            say("probing this machine's matmul FLOP/s and memory bandwidth (a few seconds)...");
        }
        let (mut m, src) = if given {
            let t = rayon::current_num_threads();
            (
                match &gpu {
                    Some((name, Some((flops, bw)))) => Machine {
                        flops: *flops,
                        bf16_flops: 0.0,
                        bandwidth: *bw,
                        read_bandwidth: *bw,
                        copy_bandwidth: *bw,
                        cpu: format!("{name} (data sheet: dense bf16 FLOP/s, HBM bandwidth)"),
                        threads: t,
                        matmul_n: 0,
                        buffer_mib: 0,
                        probed_at: 0,
                    },
                    _ => Machine {
                        flops: 0.0,
                        bf16_flops: 0.0,
                        bandwidth: 0.0,
                        read_bandwidth: 0.0,
                        copy_bandwidth: 0.0,
                        cpu: "given by --peak-gflops and --bandwidth-gbs".into(),
                        threads: t,
                        matmul_n: 0,
                        buffer_mib: 0,
                        probed_at: 0,
                    },
                },
                None,
            )
        } else {
            let (m, src) = Machine::load_or_probe(cache.as_deref(), reprobe)?;
            (m, Some(src))
        };
        if let Some(f) = a.peak_gflops {
            if f.is_nan() || f <= 0.0 {
                bail!("--peak-gflops must be positive");
            }
            m.flops = f * 1e9;
        }
        if let Some(b) = a.bandwidth_gbs {
            if b.is_nan() || b <= 0.0 {
                bail!("--bandwidth-gbs must be positive");
            }
            (m.bandwidth, m.read_bandwidth, m.copy_bandwidth) = (b * 1e9, b * 1e9, b * 1e9);
        }
        say(&match src {
            Some(ProbeSource::Cache(p)) => format!("machine probe: cached in {}", p.display()),
            Some(ProbeSource::Measured(Some(p))) => {
                format!("machine probe: measured, saved to {}", p.display())
            }
            Some(ProbeSource::Measured(None)) => "machine probe: measured (not cached)".to_string(),
            None => "machine: as given".to_string(),
        });
        say(&format!(
            "  {} ({} threads): matmul {:.1} GFLOP/s{}, bandwidth {:.1} GB/s",
            m.cpu,
            m.threads,
            m.flops / 1e9,
            m.bf16_note(),
            m.bandwidth / 1e9
        ));
        Some(m)
    };

    let spec = BenchSpec {
        runs: a.runs,
        min_seconds: a.min_time,
        warmup: a.warmup,
        seed: a.seed,
        sync_split: a.sync_split,
        kv_dtype: a.kv_cache.into(),
        // A bandwidth given by flag is another machine's (or a what-if): nothing to check.
        check_bandwidth: a.bandwidth_gbs.is_none(),
        unsteady_retries: a.retry_unsteady,
        sample_every: a.sample_bandwidth.unwrap_or(0.0),
    };
    let mut rows_by_model = Vec::new();
    // The report's header shows the first probe; with --reprobe-each every row notes its own.
    let first_machine = machine.clone();
    let mut measured = 0usize;
    let mut notes = Vec::new();
    if a.reprobe_each {
        let note = "each measurement probes the machine just before it (--reprobe-each): the header shows the first probe, each row's note its own, which its bound starts from";
        say(note);
        notes.push(note.to_string());
    }
    let mut bounds = Vec::new();
    for src in &sources {
        let name = src.name();
        bench::trim_heap();
        let (base_rss, _) = bench::rss();
        let model = Arc::new(
            src.load(a.weights_seed, &a.run, &dev, dtype)
                .with_context(|| format!("loading {name}"))?,
        );
        let (loaded_rss, _) = bench::rss();
        let mut rows = Vec::new();
        for s in &settings {
            let (p, g) = s.lengths();
            bench::check_lengths(&model, p, g).with_context(|| format!("{name}, {}", s.name()))?;
            let batches = match budget {
                None => a.batch_size.clone(),
                Some(budget) => {
                    // On a GPU the budget is already net of what the process holds there.
                    let overhead = if gpu_free.is_some() { 0 } else { base_rss };
                    let (b, why) = bench::auto_batch(
                        &model,
                        p,
                        g,
                        spec.kv_dtype,
                        budget,
                        overhead,
                        a.max_batch,
                    )
                    .with_context(|| format!("{name}, {}", s.name()))?;
                    let note = format!("{name} {}: {why}", s.name());
                    say(&note);
                    notes.push(note);
                    vec![b]
                }
            };
            for b in batches {
                let w = Workload {
                    batch: b,
                    prompt_len: p,
                    new_tokens: g,
                };
                if a.dry_run {
                    let m = machine.as_ref().expect("dry runs have a machine");
                    let mm = bench::memory_model(&model, p, g, spec.kv_dtype);
                    bounds.push(report::BoundLine {
                        model: name.clone(),
                        lm_head_screened: model.lm_head_screened(),
                        setting: s.name(),
                        workload: w,
                        bound: bench::roofline_bound(&model, &w, m, spec.kv_dtype),
                        memory: mm.total(b) + base_rss,
                        kv_per_sample: mm.kv_per_sample,
                    });
                    continue;
                }
                if budget.is_none() {
                    // A given batch: refuse one that cannot fit before allocating it.
                    if let Some(available) = bench::memory_left(&dev) {
                        bench::check_batch_fits(&model, &w, spec.kv_dtype, available)
                            .with_context(|| format!("{name}, {}", s.name()))?;
                    }
                }
                if a.reprobe_each && measured > 0 {
                    say("probing this machine again (--reprobe-each)...");
                    machine = Some(Machine::load_or_probe(cache.as_deref(), true)?.0);
                }
                measured += 1;
                let mut row = bench::bench_model(
                    &model,
                    &name,
                    w,
                    &spec,
                    machine.as_ref(),
                    (base_rss, loaded_rss),
                    |m| say(m),
                )?;
                if a.reprobe_each {
                    row.probe = machine.clone();
                }
                if a.json {
                    // The readable table carries these lines; JSON readers get them here too.
                    for line in report::row_notes(&row) {
                        say(&line);
                    }
                }
                rows.push(row);
            }
        }
        drop(model);
        rows_by_model.push(rows);
    }
    if a.dry_run {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&bounds)?);
        } else {
            if let Some(m) = &machine {
                println!(
                    "roofline at matmul {:.1} GFLOP/s{}, bandwidth {:.1} GB/s ({} threads)\n",
                    m.flops / 1e9,
                    m.bf16_note(),
                    m.bandwidth / 1e9,
                    m.threads
                );
            }
            print!("{}", report::bound_table(&bounds));
        }
        return Ok(());
    }
    let (compare, ratios) = if sources.len() == 2 && !a.compare.is_empty() {
        (
            Some((sources[0].name(), sources[1].name())),
            bench::ratios(&rows_by_model[0], &rows_by_model[1]),
        )
    } else {
        (None, Vec::new())
    };
    let rep = BenchReport {
        machine: first_machine,
        threads: rayon::current_num_threads(),
        runs: a.runs,
        min_seconds: a.min_time,
        warmup: a.warmup,
        rows: rows_by_model.into_iter().flatten().collect(),
        compare,
        ratios,
        notes,
    };
    if let Some(path) = &a.chart {
        let title = match &rep.compare {
            Some((x, y)) => format!("Throughput vs batch size: {x} vs {y}"),
            None => "Throughput vs batch size".to_string(),
        };
        std::fs::write(path, bench::chart::svg(&rep.rows, &title))
            .with_context(|| format!("writing {}", path.display()))?;
        say(&format!("chart written to {}", path.display()));
    }
    if a.json {
        println!("{}", report::json(&rep));
    } else {
        print!("{}", report::text(&rep));
    }
    if let Some(p) = blockformer::gpu::profile_report() {
        eprintln!(
            "device-time profile (BLOCKFORMER_PROFILE; the last measurement's timed runs):\n{p}"
        );
    }
    Ok(())
}
