//! Training data pipeline with the official semantics (`official-architecture.md` section 3).
//!
//! 1. **Documents**: one file = one document, or one blank-line-separated record = one
//!    document ([`DocMode`]).
//! 2. **Token cache**: documents are tokenized once and written to a compact binary file
//!    (u16 tokens when the vocabulary fits, else u32) that is memory-mapped ([`TokenCache`]).
//! 3. **Padded corpus** ([`PackedDataset`]): for block models every document `i` becomes
//!    `[pad x r_i] + doc_i + [EOS] + [pad x q_i]` with `r_i` in `0..L` drawn once per document
//!    from a seeded generator (mask 0), the EOS a real, predicted token (mask 1), and `q_i`
//!    right-padding to a multiple of `L` (mask 0). In vanilla mode documents + EOS are packed
//!    without padding. Sample `k` is the slice `[k*T, (k+1)*T)` of that corpus (wrapping), so
//!    documents are packed back to back and may be cut at sample boundaries.
//! 4. **Batches**: block samples become `[n, L]` blocks with `block_mask = any(mask)` and
//!    `labels = ids` (-100 where the mask is 0); vanilla samples are plain sequences.
//! 5. **Splits** are by file ([`split_files`]), and the sample order is a seeded permutation
//!    per epoch ([`Sampler`]): everything is deterministic given the seed.

use crate::error::{Error, Result};
use crate::model::block_transformer::BlockBatch;
use crate::tokenizer::Tokenizer;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};

/// How files are cut into documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DocMode {
    /// One file = one document.
    File,
    /// Records separated by one or more blank lines = documents.
    BlankLine,
}

impl std::str::FromStr for DocMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "file" => Ok(DocMode::File),
            "blank-line" | "blank_line" | "record" => Ok(DocMode::BlankLine),
            o => Err(Error::input(
                "doc-mode",
                format!("`{o}`; expected `file` or `blank-line`"),
            )),
        }
    }
}

/// Splits one file's text into documents.
pub fn split_documents(text: &str, mode: DocMode) -> Vec<String> {
    match mode {
        DocMode::File => {
            if text.trim().is_empty() {
                vec![]
            } else {
                vec![text.to_string()]
            }
        }
        DocMode::BlankLine => {
            let mut docs = Vec::new();
            let mut cur: Vec<&str> = Vec::new();
            for line in text.lines() {
                if line.trim().is_empty() {
                    if !cur.is_empty() {
                        docs.push(cur.join("\n"));
                        cur.clear();
                    }
                } else {
                    cur.push(line);
                }
            }
            if !cur.is_empty() {
                docs.push(cur.join("\n"));
            }
            docs
        }
    }
}

/// Reads and splits every file, in the given order.
pub fn read_documents(files: &[PathBuf], mode: DocMode) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
        out.extend(split_documents(&text, mode));
    }
    Ok(out)
}

/// Deterministic split of a file list into (train, validation): the sorted list is shuffled
/// with `seed` and the first `round(fraction * n)` files (at least one when `fraction > 0` and
/// there are two or more files) are the validation split. Both lists come back sorted.
pub fn split_files(
    files: &[PathBuf],
    valid_fraction: f64,
    seed: u64,
) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut sorted = files.to_vec();
    sorted.sort();
    sorted.dedup();
    let n = sorted.len();
    let mut k = (valid_fraction * n as f64).round() as usize;
    if valid_fraction > 0.0 && k == 0 && n >= 2 {
        k = 1;
    }
    k = k.min(n.saturating_sub(1));
    let mut shuffled = sorted.clone();
    shuffled.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_f11e));
    let mut valid: Vec<PathBuf> = shuffled[..k].to_vec();
    valid.sort();
    let train = sorted.into_iter().filter(|f| !valid.contains(f)).collect();
    (train, valid)
}

const MAGIC: &[u8; 8] = b"BFTOK01\0";
const HEADER: usize = 32;

enum Bytes {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mmap(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// Tokenized documents in a compact binary file:
/// `magic[8] | width u32 | reserved u32 | n_docs u64 | n_tokens u64 | offsets u64[n_docs+1] |
/// tokens (u16 or u32, little endian)`.
pub struct TokenCache {
    bytes: Bytes,
    width: usize,
    n_docs: usize,
    n_tokens: usize,
}

impl TokenCache {
    fn encode_file(docs: &[Vec<u32>]) -> Vec<u8> {
        let n_tokens: usize = docs.iter().map(Vec::len).sum();
        let max = docs.iter().flatten().copied().max().unwrap_or(0);
        let width = if max <= u16::MAX as u32 { 2 } else { 4 };
        let mut out = Vec::with_capacity(HEADER + 8 * (docs.len() + 1) + width * n_tokens);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(width as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(docs.len() as u64).to_le_bytes());
        out.extend_from_slice(&(n_tokens as u64).to_le_bytes());
        let mut off = 0u64;
        out.extend_from_slice(&off.to_le_bytes());
        for d in docs {
            off += d.len() as u64;
            out.extend_from_slice(&off.to_le_bytes());
        }
        for &t in docs.iter().flatten() {
            if width == 2 {
                out.extend_from_slice(&(t as u16).to_le_bytes());
            } else {
                out.extend_from_slice(&t.to_le_bytes());
            }
        }
        out
    }

    fn parse(bytes: Bytes, origin: &Path) -> Result<Self> {
        let b = bytes.as_slice();
        let bad = |m: &str| Error::input("token cache", format!("{}: {m}", origin.display()));
        if b.len() < HEADER || &b[..8] != MAGIC {
            return Err(bad("not a blockformer token cache"));
        }
        let u64_at =
            |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes")) as usize;
        let width = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) as usize;
        let (n_docs, n_tokens) = (u64_at(16), u64_at(24));
        if !(width == 2 || width == 4) || b.len() != HEADER + 8 * (n_docs + 1) + width * n_tokens {
            return Err(bad("truncated or corrupt"));
        }
        Ok(TokenCache {
            bytes,
            width,
            n_docs,
            n_tokens,
        })
    }

    /// An in-memory cache (tests, small corpora).
    pub fn from_docs(docs: &[Vec<u32>]) -> Self {
        Self::parse(Bytes::Owned(Self::encode_file(docs)), Path::new("<memory>"))
            .expect("valid encoding")
    }

    /// Writes `docs` to `path` (atomically: temp file + rename).
    pub fn write(docs: &[Vec<u32>], path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(&Self::encode_file(docs))
            .map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Memory-maps a cache file.
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is only read; caches are written atomically by rename.
        let m = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        Self::parse(Bytes::Mmap(m), path)
    }

    /// Tokenizes `files` (split by `mode`) with `tokenizer_path`, caching the result in
    /// `cache_dir` under a name derived from the tokenizer, the mode and the files' contents;
    /// a later call with the same inputs just maps the file.
    pub fn open_or_build(
        files: &[PathBuf],
        mode: DocMode,
        tokenizer_path: &Path,
        cache_dir: &Path,
    ) -> Result<(Self, PathBuf)> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let tok_bytes = std::fs::read(tokenizer_path).map_err(|e| Error::io(tokenizer_path, e))?;
        h.write(&tok_bytes);
        h.write(format!("{mode:?}").as_bytes());
        let mut texts = Vec::with_capacity(files.len());
        for f in files {
            let t = std::fs::read(f).map_err(|e| Error::io(f, e))?;
            h.write(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or(b""));
            h.write_usize(t.len());
            h.write(&t);
            texts.push(t);
        }
        let path = cache_dir.join(format!("tokens-{:016x}.bin", h.finish()));
        if path.exists() {
            if let Ok(c) = Self::open(&path) {
                return Ok((c, path));
            }
        }
        let tok = Tokenizer::from_file(tokenizer_path)?;
        let mut docs_text = Vec::new();
        for (f, t) in files.iter().zip(texts) {
            let s = String::from_utf8(t).map_err(|_| {
                Error::input("data", format!("{} is not valid UTF-8 text", f.display()))
            })?;
            docs_text.extend(split_documents(&s, mode));
        }
        use rayon::prelude::*;
        let docs = docs_text
            .par_iter()
            .map(|d| tok.encode(d))
            .collect::<Result<Vec<_>>>()?;
        Self::write(&docs, &path)?;
        Ok((Self::open(&path)?, path))
    }

    pub fn n_docs(&self) -> usize {
        self.n_docs
    }

    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    fn offset(&self, i: usize) -> usize {
        let b = self.bytes.as_slice();
        let p = HEADER + 8 * i;
        u64::from_le_bytes(b[p..p + 8].try_into().expect("8 bytes")) as usize
    }

    pub fn doc_len(&self, i: usize) -> usize {
        self.offset(i + 1) - self.offset(i)
    }

    /// Token `j` of document `i`.
    pub fn token(&self, i: usize, j: usize) -> u32 {
        let b = self.bytes.as_slice();
        let p = HEADER + 8 * (self.n_docs + 1) + self.width * (self.offset(i) + j);
        if self.width == 2 {
            u16::from_le_bytes([b[p], b[p + 1]]) as u32
        } else {
            u32::from_le_bytes(b[p..p + 4].try_into().expect("4 bytes"))
        }
    }

    pub fn doc(&self, i: usize) -> Vec<u32> {
        (0..self.doc_len(i)).map(|j| self.token(i, j)).collect()
    }
}

/// How documents are laid out in the padded corpus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    /// Block models: random left pad `0..L`, EOS, right pad to a multiple of `L`.
    Block { block_length: usize },
    /// Vanilla models: documents + EOS back to back.
    Vanilla,
}

/// The virtual padded corpus cut into fixed-length samples.
pub struct PackedDataset {
    cache: TokenCache,
    packing: Packing,
    seq_len: usize,
    eos: u32,
    pad: u32,
    /// Start of each document's padded span in the corpus, plus the total at the end.
    starts: Vec<u64>,
    /// Left pad of each document.
    left: Vec<u32>,
}

impl PackedDataset {
    /// `seed` draws the left pads (block mode), once per document, in document order.
    pub fn new(
        cache: TokenCache,
        packing: Packing,
        seq_len: usize,
        eos: u32,
        pad: u32,
        seed: u64,
    ) -> Result<Self> {
        if seq_len < 2 {
            return Err(Error::input(
                "seq-len",
                format!(
                    "{seq_len} tokens per sample; a sample needs at least 2 (one to predict from)"
                ),
            ));
        }
        if let Packing::Block { block_length } = packing {
            if block_length == 0 || !seq_len.is_multiple_of(block_length) {
                return Err(Error::input(
                    "seq-len",
                    format!("{seq_len} is not a multiple of the block length {block_length}"),
                ));
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut starts = Vec::with_capacity(cache.n_docs() + 1);
        let mut left = Vec::with_capacity(cache.n_docs());
        let mut pos = 0u64;
        for i in 0..cache.n_docs() {
            starts.push(pos);
            let n = cache.doc_len(i) + 1; // + EOS
            match packing {
                Packing::Block { block_length: l } => {
                    let r = rng.random_range(0..l);
                    left.push(r as u32);
                    pos += (r + n).div_ceil(l) as u64 * l as u64;
                }
                Packing::Vanilla => {
                    left.push(0);
                    pos += n as u64;
                }
            }
        }
        starts.push(pos);
        if pos < seq_len as u64 {
            return Err(Error::input(
                "data",
                format!(
                    "the corpus holds {pos} (padded) tokens, fewer than one sample of {seq_len}"
                ),
            ));
        }
        Ok(PackedDataset {
            cache,
            packing,
            seq_len,
            eos,
            pad,
            starts,
            left,
        })
    }

    pub fn packing(&self) -> Packing {
        self.packing
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Padded corpus length in tokens.
    pub fn corpus_len(&self) -> u64 {
        *self.starts.last().expect("non-empty")
    }

    /// Number of samples: `corpus_len // seq_len`.
    pub fn len(&self) -> usize {
        (self.corpus_len() / self.seq_len as u64) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// Left pad of each document (block mode; 0 in vanilla mode).
    pub fn left_pads(&self) -> &[u32] {
        &self.left
    }

    /// (token, mask) at corpus position `p` (`p < corpus_len`).
    pub fn at(&self, p: u64) -> (u32, u8) {
        let i = self.starts.partition_point(|&s| s <= p) - 1;
        let off = (p - self.starts[i]) as usize;
        let r = self.left[i] as usize;
        let n = self.cache.doc_len(i);
        if off < r {
            (self.pad, 0)
        } else if off < r + n {
            (self.cache.token(i, off - r), 1)
        } else if off == r + n {
            (self.eos, 1)
        } else {
            (self.pad, 0)
        }
    }

    /// Sample `k`: the corpus slice `[k*T, (k+1)*T)` (wrapping around the end), as
    /// (ids, mask).
    pub fn sample(&self, k: usize) -> (Vec<u32>, Vec<u8>) {
        let total = self.corpus_len();
        let t = self.seq_len;
        let mut ids = Vec::with_capacity(t);
        let mut mask = Vec::with_capacity(t);
        let start = (k as u64 * t as u64) % total;
        for q in 0..t as u64 {
            let (id, m) = self.at((start + q) % total);
            ids.push(id);
            mask.push(m);
        }
        (ids, mask)
    }
}

/// A training batch for either model kind.
#[derive(Clone, Debug)]
pub enum Batch {
    Block(BlockBatch),
    /// `ids [B, T]` with `labels` = ids (-100 where the mask is 0; HF shifts inside).
    Vanilla {
        batch: usize,
        seq_len: usize,
        ids: Vec<u32>,
        mask: Vec<u8>,
        labels: Vec<i64>,
    },
}

impl Batch {
    /// Token positions in the batch (every position, padding included).
    pub fn n_positions(&self) -> usize {
        match self {
            Batch::Block(b) => b.batch * b.n_blocks * b.block_length,
            Batch::Vanilla { batch, seq_len, .. } => batch * seq_len,
        }
    }
}

/// Builds a batch from samples (`SplitBlocks` + `AddLabels` of the official pipeline).
pub fn make_batch(samples: &[(Vec<u32>, Vec<u8>)], packing: Packing) -> Batch {
    let b = samples.len();
    let t = samples.first().map(|s| s.0.len()).unwrap_or(0);
    let ids: Vec<u32> = samples.iter().flat_map(|s| s.0.iter().copied()).collect();
    let mask: Vec<u8> = samples.iter().flat_map(|s| s.1.iter().copied()).collect();
    let labels: Vec<i64> = ids
        .iter()
        .zip(&mask)
        .map(|(&i, &m)| if m == 1 { i as i64 } else { -100 })
        .collect();
    match packing {
        Packing::Block { block_length: l } => {
            let block_mask = mask.chunks(l).map(|c| c.contains(&1) as u8).collect();
            Batch::Block(BlockBatch {
                batch: b,
                n_blocks: t / l,
                block_length: l,
                input_ids: ids,
                attention_mask: mask,
                block_mask,
                labels: Some(labels),
            })
        }
        Packing::Vanilla => Batch::Vanilla {
            batch: b,
            seq_len: t,
            ids,
            mask,
            labels,
        },
    }
}

/// Seeded sample order: a fresh permutation of `0..n` per epoch.
#[derive(Clone, Debug)]
pub struct Sampler {
    n: usize,
    seed: u64,
    epoch: Option<u64>,
    perm: Vec<usize>,
}

impl Sampler {
    pub fn new(n: usize, seed: u64) -> Self {
        Sampler {
            n,
            seed,
            epoch: None,
            perm: Vec::new(),
        }
    }

    /// The sample index of the `counter`-th draw (counter counts across epochs).
    pub fn index(&mut self, counter: u64) -> usize {
        let epoch = counter / self.n as u64;
        if self.epoch != Some(epoch) {
            let mut p: Vec<usize> = (0..self.n).collect();
            p.shuffle(&mut ChaCha8Rng::seed_from_u64(
                self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ epoch,
            ));
            self.perm = p;
            self.epoch = Some(epoch);
        }
        self.perm[(counter % self.n as u64) as usize]
    }
}
