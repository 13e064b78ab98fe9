//! `ContrastiveTensionDataLoader` (spec §2.18): batches of sentence pairs for
//! Contrastive Tension, one identical pair per `pos_neg_ratio` pairs.
//!
//! Owns the sentence list and its seeded shuffle across epochs. It must not
//! tokenize, collate or touch tensors; batches are plain `(text, text, label)`
//! triples, as ST yields them before a `collate_fn`.
//!
//! Differences from ST 6.2.0, by design: the shuffle uses lossc's own seeded
//! generator (`bind::SplitMix64`, Fisher–Yates), not Python's global `random`,
//! so sentence orders differ from ST's; ratios, shapes, `len()` and which
//! positions hold positives are the same. `batch_size` has no default (as in
//! ST) and neither does `pos_neg_ratio` here: ST's default is 8 (the product
//! spec's 4 is not ST's), and callers must pick it explicitly. Where ST would
//! fail with `ZeroDivisionError` (a zero batch size or ratio), this returns an
//! error from `new`.

use super::shuffle::fisher_yates;
use crate::bind::SplitMix64;

/// One example: `(sentence_1, sentence_2, label)`, label 1.0 when both are
/// the same sentence, 0.0 when they are two different list entries.
pub type CtPair = (String, String, f64);

/// One batch of exactly `batch_size` pairs.
pub type CtBatch = Vec<CtPair>;

pub struct ContrastiveTensionDataLoader {
    /// Kept in the order of the last shuffle: ST shuffles its list in place,
    /// so each epoch permutes the previous epoch's order, not the original.
    sentences: Vec<String>,
    batch_size: usize,
    pos_neg_ratio: usize,
    /// Sentences one batch consumes, 2b − b/r; checked not to overflow once.
    per_batch: usize,
    /// One stream for the loader's whole life, so epoch k + 1 differs from
    /// epoch k while the same seed replays the same sequence of epochs.
    rng: SplitMix64,
}

impl std::fmt::Debug for ContrastiveTensionDataLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContrastiveTensionDataLoader")
            .field("sentences", &self.sentences.len())
            .field("batch_size", &self.batch_size)
            .field("pos_neg_ratio", &self.pos_neg_ratio)
            .finish_non_exhaustive()
    }
}

impl ContrastiveTensionDataLoader {
    /// ST's `ContrastiveTensionDataLoader(sentences, batch_size, pos_neg_ratio)`
    /// with the shuffle seeded by `seed`.
    pub fn new(
        sentences: Vec<String>,
        batch_size: usize,
        pos_neg_ratio: usize,
        seed: u64,
    ) -> Result<Self, String> {
        let per_batch = check_sizes(batch_size, pos_neg_ratio)?;
        Ok(ContrastiveTensionDataLoader {
            sentences,
            batch_size,
            pos_neg_ratio,
            per_batch,
            rng: SplitMix64::new(seed),
        })
    }

    /// Batches per epoch: floor(N / (2b − b/r)), exact (ST 6.2.0).
    pub fn len(&self) -> usize {
        self.sentences.len() / self.per_batch
    }

    /// True when an epoch yields no batch (fewer than 2b − b/r sentences).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn pos_neg_ratio(&self) -> usize {
        self.pos_neg_ratio
    }

    /// The sentence list in its current (last shuffled) order.
    pub fn sentences(&self) -> &[String] {
        &self.sentences
    }

    /// One pass: shuffle the list in place, then read it front to back into
    /// `len()` batches. Pair t of a batch is a positive `(s, s, 1.0)` when
    /// t % r == 0 and a negative `(s, s', 0.0)` otherwise; sentences left
    /// over after the last full batch are not used this epoch.
    pub fn epoch(&mut self) -> Vec<CtBatch> {
        fisher_yates(&mut self.rng, &mut self.sentences);
        let mut cursor = self.sentences.iter();
        (0..self.len())
            .map(|_| self.read_batch(&mut cursor))
            .collect()
    }

    fn read_batch<'s>(&self, cursor: &mut impl Iterator<Item = &'s String>) -> CtBatch {
        (0..self.batch_size)
            .map(|t| {
                let s1 = next_sentence(cursor);
                if t % self.pos_neg_ratio == 0 {
                    (s1.clone(), s1, 1.0)
                } else {
                    (s1, next_sentence(cursor), 0.0)
                }
            })
            .collect()
    }
}

/// The next sentence of a batch. `len()` only counts batches whose
/// sentences all exist, so running out here is a bug in this module.
fn next_sentence<'s>(cursor: &mut impl Iterator<Item = &'s String>) -> String {
    match cursor.next() {
        Some(s) => s.clone(),
        None => unreachable!("len() promised enough sentences for every batch"),
    }
}

/// Validates b and r as ST does (plus the cases where ST divides by zero)
/// and returns the sentences one batch consumes.
fn check_sizes(batch_size: usize, pos_neg_ratio: usize) -> Result<usize, String> {
    const WHO: &str = "ContrastiveTensionDataLoader";
    if batch_size == 0 {
        return Err(format!("{WHO}: batch_size must be > 0 (got 0)"));
    }
    if pos_neg_ratio == 0 {
        return Err(format!(
            "{WHO}: pos_neg_ratio must be > 0 (got 0); ST's default is 8"
        ));
    }
    if !batch_size.is_multiple_of(pos_neg_ratio) {
        return Err(format!(
            "{WHO}: batch_size {batch_size} is not a multiple of pos_neg_ratio \
             {pos_neg_ratio}; the batch size must be divisible by the ratio"
        ));
    }
    // b positives-and-firsts plus one second sentence per negative.
    let negatives = batch_size - batch_size / pos_neg_ratio;
    batch_size
        .checked_add(negatives)
        .ok_or_else(|| format!("{WHO}: batch_size {batch_size} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("s{i}")).collect()
    }

    #[test]
    fn ratio_one_makes_only_positives() {
        let mut dl = ContrastiveTensionDataLoader::new(words(10), 3, 1, 0).unwrap();
        assert_eq!(dl.len(), 3);
        let batches = dl.epoch();
        assert!(batches
            .iter()
            .flatten()
            .all(|(a, b, y)| a == b && *y == 1.0));
    }

    #[test]
    fn ratio_equal_to_batch_gives_one_positive_first() {
        let mut dl = ContrastiveTensionDataLoader::new(words(30), 4, 4, 3).unwrap();
        // 2·4 − 1 = 7 sentences per batch.
        assert_eq!(dl.len(), 4);
        for batch in dl.epoch() {
            let labels: Vec<f64> = batch.iter().map(|p| p.2).collect();
            assert_eq!(labels, vec![1.0, 0.0, 0.0, 0.0]);
        }
    }

    #[test]
    fn debug_does_not_dump_sentences() {
        let dl = ContrastiveTensionDataLoader::new(words(3), 2, 2, 0).unwrap();
        let shown = format!("{dl:?}");
        assert!(shown.contains("batch_size: 2"), "{shown}");
        assert!(!shown.contains("s0"), "{shown}");
    }

    #[test]
    fn huge_batch_size_is_an_error_not_an_overflow() {
        let err = check_sizes(usize::MAX, 1).map(|_| ());
        // r = 1 has no negatives, so b itself is the per-batch count.
        assert_eq!(err, Ok(()));
        let err = check_sizes(usize::MAX - 1, 2).unwrap_err();
        assert!(err.contains("too large"), "{err}");
    }
}
