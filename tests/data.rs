//! Integration tests of `lossc::data`: the Contrastive Tension data loader
//! (spec §2.18) and the multi-task batch schedule (spec §3).
//!
//! Orders are lossc's own (seeded SplitMix64), so tests assert the properties
//! ST guarantees (ratios, shapes, counts, determinism), never ST's orders.

use std::collections::{BTreeMap, HashSet};

use lossc::data::{ContrastiveTensionDataLoader, CtBatch, MultiTask, Sampler, Task};
use serde_json::json;

fn sentences(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("sentence {i}")).collect()
}

fn loader(n: usize, b: usize, r: usize, seed: u64) -> ContrastiveTensionDataLoader {
    match ContrastiveTensionDataLoader::new(sentences(n), b, r, seed) {
        Ok(dl) => dl,
        Err(e) => panic!("valid loader refused: {e}"),
    }
}

// ---------------------------------------------------------------- CT loader

#[test]
fn ct_len_is_floor_n_over_2b_minus_b_over_r() {
    // (N, b, r, expected): 2b − b/r sentences per batch.
    let cases = [
        (100, 8, 8, 6),    // 15 per batch
        (15, 8, 8, 1),     // exactly one batch
        (14, 8, 8, 0),     // one short
        (0, 8, 8, 0),      // empty list
        (100, 8, 4, 7),    // 14 per batch
        (100, 8, 2, 8),    // 12 per batch
        (100, 8, 1, 12),   // 8 per batch: all positives
        (1000, 32, 8, 16), // 60 per batch: 16·60 = 960
        (7, 3, 3, 1),      // 5 per batch
    ];
    for (n, b, r, want) in cases {
        let dl = loader(n, b, r, 0);
        assert_eq!(dl.len(), want, "N={n} b={b} r={r}");
        assert_eq!(dl.is_empty(), want == 0);
    }
}

#[test]
fn ct_batches_have_b_pairs_and_positives_at_multiples_of_r() {
    for (n, b, r) in [
        (200, 8, 8),
        (200, 8, 4),
        (200, 12, 3),
        (50, 6, 1),
        (97, 10, 5),
    ] {
        let mut dl = loader(n, b, r, 42);
        let batches = dl.epoch();
        assert_eq!(batches.len(), dl.len(), "N={n} b={b} r={r}");
        for batch in &batches {
            assert_eq!(batch.len(), b);
            check_batch_labels(batch, r);
        }
    }
}

fn check_batch_labels(batch: &CtBatch, r: usize) {
    let positives: Vec<usize> = (0..batch.len()).filter(|&t| batch[t].2 == 1.0).collect();
    let expected: Vec<usize> = (0..batch.len()).step_by(r).collect();
    assert_eq!(positives, expected, "positives at 0, r, 2r, ...");
    assert_eq!(positives.len(), batch.len() / r, "exactly b/r positives");
    for (s1, s2, y) in batch {
        assert!(*y == 1.0 || *y == 0.0);
        // A positive repeats one sentence; a negative joins two distinct
        // list entries (and the test sentences are all different).
        assert_eq!(s1 == s2, *y == 1.0, "({s1}, {s2}, {y})");
    }
}

#[test]
fn ct_uses_each_sentence_at_most_once_per_epoch() {
    let (n, b, r) = (103, 8, 4);
    let mut dl = loader(n, b, r, 5);
    for _ in 0..3 {
        let used = sentences_used(&dl.epoch());
        let distinct: HashSet<&String> = used.iter().collect();
        assert_eq!(distinct.len(), used.len(), "a sentence was used twice");
        // And it reads a prefix of the shuffled list, in order.
        assert_eq!(used.len(), dl.len() * (2 * b - b / r));
        assert_eq!(&dl.sentences()[..used.len()], &used[..]);
    }
}

/// Every list entry a batch consumed, in reading order (a positive's
/// sentence counts once).
fn sentences_used(batches: &[CtBatch]) -> Vec<String> {
    let mut used = Vec::new();
    for (s1, s2, y) in batches.iter().flatten() {
        used.push(s1.clone());
        if *y == 0.0 {
            used.push(s2.clone());
        }
    }
    used
}

#[test]
fn ct_shuffle_keeps_the_sentence_set() {
    let mut dl = loader(40, 4, 2, 1);
    dl.epoch();
    let mut now = dl.sentences().to_vec();
    now.sort();
    let mut orig = sentences(40);
    orig.sort();
    assert_eq!(now, orig);
}

#[test]
fn ct_is_deterministic_per_seed_and_reshuffles_each_epoch() {
    let epochs = |seed| {
        let mut dl = loader(150, 8, 4, seed);
        (0..3).map(|_| dl.epoch()).collect::<Vec<_>>()
    };
    let a = epochs(11);
    assert_eq!(a, epochs(11), "same seed, same sequence of epochs");
    assert_ne!(a, epochs(12), "different seeds, different orders");
    assert_ne!(a[0], a[1], "successive epochs reshuffle");
    assert_ne!(a[1], a[2]);
}

#[test]
fn ct_rejects_batch_size_not_a_multiple_of_ratio() {
    let err = ContrastiveTensionDataLoader::new(sentences(10), 10, 4, 0).unwrap_err();
    assert!(
        err.contains("10") && err.contains('4'),
        "names both numbers: {err}"
    );
    assert!(
        err.contains("batch_size") && err.contains("pos_neg_ratio"),
        "{err}"
    );
}

#[test]
fn ct_rejects_zero_sizes() {
    let err = ContrastiveTensionDataLoader::new(sentences(10), 0, 8, 0).unwrap_err();
    assert!(err.contains("batch_size must be > 0"), "{err}");
    let err = ContrastiveTensionDataLoader::new(sentences(10), 8, 0, 0).unwrap_err();
    assert!(err.contains("pos_neg_ratio must be > 0"), "{err}");
}

#[test]
fn ct_too_few_sentences_gives_no_batch() {
    let mut dl = loader(1, 2, 2, 0);
    assert!(dl.epoch().is_empty());
    assert_eq!(dl.batch_size(), 2);
    assert_eq!(dl.pos_neg_ratio(), 2);
}

// ---------------------------------------------------------------- multi-task

fn task(name: &str, loss: &str, num_batches: usize) -> Task {
    Task {
        name: name.to_string(),
        loss: loss.to_string(),
        params: json!({}),
        num_batches,
    }
}

fn three_tasks(a: usize, b: usize, c: usize) -> MultiTask {
    MultiTask {
        tasks: vec![
            task("nli", "MultipleNegativesRankingLoss", a),
            task("sts", "CoSENTLoss", b),
            task("quora", "ContrastiveLoss", c),
        ],
    }
}

fn schedule(mt: &MultiTask, sampler: Sampler, seed: u64) -> Vec<String> {
    match mt.schedule(sampler, seed) {
        Ok(s) => s,
        Err(e) => panic!("valid tasks refused: {e}"),
    }
}

#[test]
fn round_robin_with_unequal_sizes_stops_at_first_exhausted() {
    // ST cycles nli, sts, quora, ... and stops when it reaches sts's third
    // turn with sts empty: nli got one turn more than the smallest.
    let order = schedule(&three_tasks(5, 2, 4), Sampler::RoundRobin, 0);
    assert_eq!(order, ["nli", "sts", "quora", "nli", "sts", "quora", "nli"]);
    // Smallest first: exactly min·k batches, no extra turn.
    let order = schedule(&three_tasks(1, 3, 3), Sampler::RoundRobin, 0);
    assert_eq!(order, ["nli", "sts", "quora"]);
    // Smallest last: every earlier dataset gets its extra turn.
    let order = schedule(&three_tasks(3, 3, 1), Sampler::RoundRobin, 0);
    assert_eq!(order, ["nli", "sts", "quora", "nli", "sts"]);
}

#[test]
fn round_robin_ignores_the_seed() {
    let mt = three_tasks(4, 2, 3);
    assert_eq!(
        schedule(&mt, Sampler::RoundRobin, 1),
        schedule(&mt, Sampler::RoundRobin, 2)
    );
}

#[test]
fn proportional_draws_every_batch_once() {
    let mt = three_tasks(7, 2, 4);
    let order = schedule(&mt, Sampler::Proportional, 3);
    assert_eq!(order.len(), 13);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for name in &order {
        *counts.entry(name.as_str()).or_default() += 1;
    }
    let want: BTreeMap<&str, usize> = [("nli", 7), ("sts", 2), ("quora", 4)].into();
    assert_eq!(counts, want);
}

#[test]
fn proportional_is_seeded() {
    let mt = three_tasks(10, 6, 8);
    let a = schedule(&mt, Sampler::Proportional, 7);
    assert_eq!(a, schedule(&mt, Sampler::Proportional, 7));
    assert_ne!(a, schedule(&mt, Sampler::Proportional, 8));
    // Epochs reseed with seed + epoch, as ST does.
    let e1 = mt.schedule_epoch(Sampler::Proportional, 7, 1);
    assert_eq!(e1, Ok(schedule(&mt, Sampler::Proportional, 8)));
}

#[test]
fn missing_losses_are_listed() {
    let mut mt = three_tasks(1, 1, 1);
    mt.tasks[0].loss = String::new();
    mt.tasks[2].loss = "  ".to_string();
    let err = mt.schedule(Sampler::RoundRobin, 0).unwrap_err();
    assert_eq!(
        err,
        "every dataset name must have a loss: ['nli', 'quora'] have none"
    );
}

#[test]
fn from_parts_pairs_datasets_with_losses_by_name() {
    let datasets = vec![("a".to_string(), 2), ("b".to_string(), 3)];
    let losses = vec![
        (
            "b".to_string(),
            "CoSENTLoss".to_string(),
            json!({"scale": 20.0}),
        ),
        ("a".to_string(), "MSELoss".to_string(), json!({})),
        ("unused".to_string(), "TripletLoss".to_string(), json!({})),
    ];
    let mt = MultiTask::from_parts(datasets, losses).unwrap();
    assert_eq!(mt.tasks[0], task("a", "MSELoss", 2));
    assert_eq!(mt.tasks[1].loss, "CoSENTLoss");
    assert_eq!(mt.tasks[1].params, json!({"scale": 20.0}));

    let datasets = vec![("a".to_string(), 2), ("stsb-extra".to_string(), 1)];
    let losses = vec![("a".to_string(), "MSELoss".to_string(), json!({}))];
    let err = MultiTask::from_parts(datasets, losses).unwrap_err();
    assert_eq!(
        err,
        "every dataset name must have a loss: ['stsb-extra'] has none"
    );
}

#[test]
fn empty_and_duplicate_task_lists_are_errors() {
    let err = MultiTask::default()
        .schedule(Sampler::Proportional, 0)
        .unwrap_err();
    assert!(err.contains("at least one dataset"), "{err}");
    let mut mt = three_tasks(1, 1, 1);
    mt.tasks[2].name = "nli".to_string();
    let err = mt.check().unwrap_err();
    assert!(err.contains("`nli` is used twice"), "{err}");
}
