//! Data pipeline semantics (official-architecture.md section 3): random left pads, EOS,
//! padding to block boundaries, packing into fixed-length samples, splits, the token cache.

use blockformer::data::*;
use std::path::PathBuf;

const EOS: u32 = 0;
const PAD: u32 = 0;

fn docs() -> Vec<Vec<u32>> {
    // Ids >= 2 so that real tokens never look like EOS / padding.
    [5usize, 3, 9, 1, 12, 4, 7, 2, 8, 6]
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| (2 + 10 * i + j) as u32).collect())
        .collect()
}

fn corpus(ds: &PackedDataset) -> Vec<(u32, u8)> {
    (0..ds.corpus_len()).map(|p| ds.at(p)).collect()
}

#[test]
fn block_packing_pads_eos_and_block_boundaries() {
    let l = 4;
    let d = docs();
    let ds = PackedDataset::new(
        TokenCache::from_docs(&d),
        Packing::Block { block_length: l },
        16,
        EOS,
        PAD,
        42,
    )
    .unwrap();
    let c = corpus(&ds);
    assert_eq!(c.len() % l, 0);
    let mut p = 0;
    let pads = ds.left_pads().to_vec();
    assert_eq!(pads.len(), d.len());
    for (i, doc) in d.iter().enumerate() {
        let r = pads[i] as usize;
        assert!(r < l, "left pad {r} must be in 0..L");
        // Every document starts on a block boundary.
        assert_eq!(p % l, 0, "doc {i} starts at {p}");
        for _ in 0..r {
            assert_eq!(c[p], (PAD, 0), "doc {i}: left pad");
            p += 1;
        }
        for &t in doc {
            assert_eq!(c[p], (t, 1), "doc {i}: token");
            p += 1;
        }
        assert_eq!(c[p], (EOS, 1), "doc {i}: EOS is a real token");
        p += 1;
        while p % l != 0 {
            assert_eq!(c[p], (PAD, 0), "doc {i}: right pad to the block boundary");
            p += 1;
        }
    }
    assert_eq!(p, c.len());
    // Every block of the corpus has at least one real token (block mask all ones in training).
    for b in c.chunks(l) {
        assert!(b.iter().any(|x| x.1 == 1));
    }
    // The draws cover several values, and are deterministic given the seed.
    let again = PackedDataset::new(
        TokenCache::from_docs(&d),
        Packing::Block { block_length: l },
        16,
        EOS,
        PAD,
        42,
    )
    .unwrap();
    assert_eq!(again.left_pads(), ds.left_pads());
    let other = PackedDataset::new(
        TokenCache::from_docs(&d),
        Packing::Block { block_length: l },
        16,
        EOS,
        PAD,
        7,
    )
    .unwrap();
    assert_ne!(other.left_pads(), ds.left_pads());
    let mut distinct = pads.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() >= 2, "pads {pads:?}");
}

#[test]
fn samples_pack_the_corpus_back_to_back_and_wrap() {
    let l = 4;
    let t = 12;
    let ds = PackedDataset::new(
        TokenCache::from_docs(&docs()),
        Packing::Block { block_length: l },
        t,
        EOS,
        PAD,
        1,
    )
    .unwrap();
    let c = corpus(&ds);
    assert_eq!(ds.len(), c.len() / t);
    for k in 0..ds.len() + 2 {
        let (ids, mask) = ds.sample(k);
        assert_eq!(ids.len(), t);
        for q in 0..t {
            let p = (k * t + q) % c.len();
            assert_eq!((ids[q], mask[q]), c[p], "sample {k} position {q}");
        }
    }
    // Batches: [n, L] blocks, block mask = any(mask), labels = ids or -100.
    let samples: Vec<_> = (0..3).map(|k| ds.sample(k)).collect();
    let Batch::Block(b) = make_batch(&samples, ds.packing()) else {
        panic!("block batch expected")
    };
    assert_eq!((b.batch, b.n_blocks, b.block_length), (3, t / l, l));
    let labels = b.labels.unwrap();
    for ((&id, &m), &lab) in b.input_ids.iter().zip(&b.attention_mask).zip(&labels) {
        let want = if m == 1 { id as i64 } else { -100 };
        assert_eq!(lab, want);
    }
    for (j, &bm) in b.block_mask.iter().enumerate() {
        let any = b.attention_mask[j * l..(j + 1) * l].contains(&1);
        assert_eq!(bm == 1, any);
    }
}

#[test]
fn vanilla_packing_is_documents_plus_eos() {
    let d = docs();
    let ds =
        PackedDataset::new(TokenCache::from_docs(&d), Packing::Vanilla, 10, EOS, PAD, 3).unwrap();
    let want: Vec<(u32, u8)> = d
        .iter()
        .flat_map(|x| x.iter().map(|&t| (t, 1)).chain([(EOS, 1)]))
        .collect();
    assert_eq!(corpus(&ds), want);
    assert_eq!(ds.len(), want.len() / 10);
    let (ids, mask) = ds.sample(1);
    assert_eq!(ids, want[10..20].iter().map(|x| x.0).collect::<Vec<_>>());
    assert!(mask.iter().all(|&m| m == 1));
}

#[test]
fn block_sequence_length_must_be_a_multiple_of_the_block() {
    let e = PackedDataset::new(
        TokenCache::from_docs(&docs()),
        Packing::Block { block_length: 4 },
        10,
        EOS,
        PAD,
        0,
    );
    assert!(e.is_err());
}

#[test]
fn sampler_is_a_seeded_permutation_per_epoch() {
    let mut s = Sampler::new(10, 5);
    let e0: Vec<usize> = (0..10).map(|c| s.index(c)).collect();
    let e1: Vec<usize> = (10..20).map(|c| s.index(c)).collect();
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    assert_ne!(e0, e1);
    let mut s2 = Sampler::new(10, 5);
    assert_eq!(s2.index(13), e1[3]);
}

#[test]
fn file_split_is_deterministic_and_disjoint() {
    let files: Vec<PathBuf> = (0..20)
        .map(|i| PathBuf::from(format!("f{i:02}.txt")))
        .collect();
    let (t, v) = split_files(&files, 0.1, 0);
    assert_eq!(v.len(), 2);
    assert_eq!(t.len(), 18);
    assert!(v.iter().all(|f| !t.contains(f)));
    assert_eq!(split_files(&files, 0.1, 0), (t.clone(), v.clone()));
    let mut shuffled = files.clone();
    shuffled.reverse();
    assert_eq!(split_files(&shuffled, 0.1, 0), (t, v.clone()));
    let (_, v2) = split_files(&files, 0.1, 1);
    assert_ne!(v, v2);
}

#[test]
fn blank_line_records_are_documents() {
    let text = "first record\nline two\n\n\n  \nsecond\n\nthird\n";
    assert_eq!(
        split_documents(text, DocMode::BlankLine),
        vec!["first record\nline two", "second", "third"]
    );
    assert_eq!(split_documents(text, DocMode::File), vec![text]);
    assert!(split_documents("  \n", DocMode::File).is_empty());
}

#[test]
fn token_cache_round_trips_and_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    // u16 and u32 widths.
    for big in [false, true] {
        let mut d = docs();
        if big {
            d[2][1] = 70_000;
        }
        let p = dir.path().join(format!("c{big}.bin"));
        TokenCache::write(&d, &p).unwrap();
        let c = TokenCache::open(&p).unwrap();
        assert_eq!(c.n_docs(), d.len());
        for (i, doc) in d.iter().enumerate() {
            assert_eq!(&c.doc(i), doc);
        }
        let size = std::fs::metadata(&p).unwrap().len() as usize;
        let n: usize = d.iter().map(Vec::len).sum();
        assert_eq!(size, 32 + 8 * (d.len() + 1) + n * if big { 4 } else { 2 });
    }

    // Real text: tokenizer trained on it, documents by blank lines, cached once.
    let text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n\nThe slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n\nAnd by opposing end them. To die-to sleep,\n";
    let f = dir.path().join("play.txt");
    std::fs::write(&f, text.repeat(3)).unwrap();
    let tok_path = dir.path().join("tok.json");
    let tok =
        blockformer::tokenizer::Tokenizer::train_bpe(std::slice::from_ref(&f), 300, &tok_path)
            .unwrap();
    let cache_dir = dir.path().join("cache");
    let (c, p1) = TokenCache::open_or_build(
        std::slice::from_ref(&f),
        DocMode::BlankLine,
        &tok_path,
        &cache_dir,
    )
    .unwrap();
    let want = split_documents(&text.repeat(3), DocMode::BlankLine);
    assert_eq!(c.n_docs(), want.len());
    for (i, w) in want.iter().enumerate() {
        assert_eq!(&tok.decode(&c.doc(i)).unwrap(), w);
    }
    let mtime = std::fs::metadata(&p1).unwrap().modified().unwrap();
    let (_, p2) = TokenCache::open_or_build(
        std::slice::from_ref(&f),
        DocMode::BlankLine,
        &tok_path,
        &cache_dir,
    )
    .unwrap();
    assert_eq!(p1, p2);
    assert_eq!(std::fs::metadata(&p2).unwrap().modified().unwrap(), mtime);
    // Another document mode is another cache.
    let (c3, p3) = TokenCache::open_or_build(&[f], DocMode::File, &tok_path, &cache_dir).unwrap();
    assert_ne!(p1, p3);
    assert_eq!(c3.n_docs(), 1);
}
