//! Multi-task training's batch schedule (spec §3): several named datasets,
//! each with its own loss, and the order in which ST's multi-dataset batch
//! sampler draws their batches.
//!
//! Owns the task list, the "every dataset has a loss" check and the schedule
//! (one dataset name per batch). It must not build batches, evaluate losses or
//! sum them: in ST every batch comes from exactly one dataset and only that
//! dataset's loss runs on it.
//!
//! Seeds: ST seeds its torch generator with `seed + epoch` for every epoch;
//! `schedule_epoch` does the same with lossc's `SplitMix64`. The PROPORTIONAL
//! permutation is therefore lossc's own (ST draws it with `torch.randperm`):
//! which dataset comes when differs from ST, how often each one comes does
//! not. ROUND_ROBIN uses no randomness and is identical to ST's.

use std::collections::BTreeSet;
use std::str::FromStr;

use super::shuffle::fisher_yates;
use crate::bind::SplitMix64;

/// ST's `MultiDatasetBatchSamplers`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sampler {
    /// `round_robin`: one batch of each dataset in turn, in task order; stops
    /// at the first dataset that has no batch left.
    RoundRobin,
    /// `proportional` (ST's default): every batch of every dataset once per
    /// epoch, in a seeded random order.
    #[default]
    Proportional,
}

impl Sampler {
    /// ST's string for the sampler.
    pub fn name(self) -> &'static str {
        match self {
            Sampler::RoundRobin => "round_robin",
            Sampler::Proportional => "proportional",
        }
    }
}

impl FromStr for Sampler {
    type Err = String;

    fn from_str(s: &str) -> Result<Sampler, String> {
        match s {
            "round_robin" => Ok(Sampler::RoundRobin),
            "proportional" => Ok(Sampler::Proportional),
            other => Err(format!(
                "unknown multi-dataset batch sampler `{other}`; expected `round_robin` or \
                 `proportional`"
            )),
        }
    }
}

/// One (dataset, loss) pair. `num_batches` is what the dataset's own batch
/// sampler yields per epoch (e.g. floor(rows / batch_size) with drop_last).
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    pub name: String,
    /// The loss's name; empty means the dataset has no loss.
    pub loss: String,
    pub params: serde_json::Value,
    pub num_batches: usize,
}

/// The tasks of one training run, in the order ST's `DatasetDict` lists them
/// (that order decides round robin's turns and proportional's draw list).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MultiTask {
    pub tasks: Vec<Task>,
}

impl MultiTask {
    /// Pairs datasets `(name, num_batches)` with losses `(name, loss, params)`
    /// by name, as ST pairs its dataset dict with its loss dict. Losses with no
    /// dataset are ignored (ST allows them); datasets with no loss are an error.
    pub fn from_parts(
        datasets: Vec<(String, usize)>,
        losses: Vec<(String, String, serde_json::Value)>,
    ) -> Result<MultiTask, String> {
        let tasks = datasets
            .into_iter()
            .map(|(name, num_batches)| {
                let found = losses.iter().find(|(n, _, _)| *n == name);
                let (loss, params) = match found {
                    Some((_, l, p)) => (l.clone(), p.clone()),
                    None => (String::new(), serde_json::Value::Null),
                };
                Task {
                    name,
                    loss,
                    params,
                    num_batches,
                }
            })
            .collect();
        let mt = MultiTask { tasks };
        mt.check()?;
        Ok(mt)
    }

    /// ST's preconditions: at least one dataset, unique names, and every
    /// dataset name has a loss (the error lists all that lack one, sorted).
    pub fn check(&self) -> Result<(), String> {
        if self.tasks.is_empty() {
            return Err("multi-task training needs at least one dataset".to_string());
        }
        let mut seen = BTreeSet::new();
        for t in &self.tasks {
            if !seen.insert(t.name.as_str()) {
                return Err(format!("dataset name `{}` is used twice", t.name));
            }
        }
        let missing: BTreeSet<&str> = self
            .tasks
            .iter()
            .filter(|t| t.loss.trim().is_empty())
            .map(|t| t.name.as_str())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(missing_loss_message(&missing))
    }

    /// The dataset name of every batch of one epoch, in the order ST's
    /// sampler draws them; `seed` seeds the proportional permutation.
    pub fn schedule(&self, sampler: Sampler, seed: u64) -> Result<Vec<String>, String> {
        self.check()?;
        let order = match sampler {
            Sampler::RoundRobin => round_robin(&self.counts()),
            Sampler::Proportional => proportional(&self.counts(), seed),
        };
        Ok(order
            .into_iter()
            .map(|i| self.tasks[i].name.clone())
            .collect())
    }

    /// `schedule` for epoch `epoch` of a run seeded with `seed`: ST reseeds
    /// its sampler with `seed + epoch` at the start of every epoch.
    pub fn schedule_epoch(
        &self,
        sampler: Sampler,
        seed: u64,
        epoch: u64,
    ) -> Result<Vec<String>, String> {
        self.schedule(sampler, seed.wrapping_add(epoch))
    }

    fn counts(&self) -> Vec<usize> {
        self.tasks.iter().map(|t| t.num_batches).collect()
    }
}

/// ST words this as "all keys from the `train_dataset` dictionary must occur
/// in `loss` also"; the names are listed so one run reports them all.
fn missing_loss_message(missing: &BTreeSet<&str>) -> String {
    let names: Vec<String> = missing.iter().map(|n| format!("'{n}'")).collect();
    let verb = if missing.len() == 1 { "has" } else { "have" };
    format!(
        "every dataset name must have a loss: [{}] {verb} none",
        names.join(", ")
    )
}

/// ST's `RoundRobinBatchSampler`: cycle over the datasets in order and stop
/// at the first one that is exhausted. So with min count m, every dataset
/// gets m turns and those before the first dataset of size m get one more
/// (ST's `__len__` says k·m, its iterator yields these extra batches too).
fn round_robin(counts: &[usize]) -> Vec<usize> {
    let mut left = counts.to_vec();
    let mut order = Vec::new();
    for i in (0..counts.len()).cycle() {
        if left[i] == 0 {
            break;
        }
        left[i] -= 1;
        order.push(i);
    }
    order
}

/// ST's `ProportionalBatchSampler`: the list [0]*c0 + [1]*c1 + ... in a
/// seeded random order, so every batch of every dataset is drawn once.
fn proportional(counts: &[usize], seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = counts
        .iter()
        .enumerate()
        .flat_map(|(i, &c)| std::iter::repeat_n(i, c))
        .collect();
    fisher_yates(&mut SplitMix64::new(seed), &mut order);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_stops_at_first_exhausted_dataset() {
        assert_eq!(round_robin(&[3, 1, 2]), vec![0, 1, 2, 0]);
        assert_eq!(round_robin(&[1, 3, 2]), vec![0, 1, 2]);
        assert_eq!(round_robin(&[2, 2]), vec![0, 1, 0, 1]);
        assert_eq!(round_robin(&[2, 0]), vec![0]);
        assert_eq!(round_robin(&[0, 5]), Vec::<usize>::new());
    }

    #[test]
    fn proportional_is_a_permutation_of_the_counts() {
        let mut order = proportional(&[2, 0, 3], 9);
        order.sort();
        assert_eq!(order, vec![0, 0, 2, 2, 2]);
    }

    #[test]
    fn sampler_names_round_trip() {
        for s in [Sampler::RoundRobin, Sampler::Proportional] {
            assert_eq!(s.name().parse::<Sampler>(), Ok(s));
        }
        assert_eq!(Sampler::default(), Sampler::Proportional);
        let err = "ROUND_ROBIN".parse::<Sampler>().unwrap_err();
        assert!(
            err.contains("round_robin") && err.contains("proportional"),
            "{err}"
        );
    }
}
