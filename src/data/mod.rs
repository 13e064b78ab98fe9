//! Data-side utilities that sentence-transformers (ST) keeps next to its
//! losses: the Contrastive Tension data loader (spec §2.18) and the batch
//! schedule of multi-task training (spec §3).
//!
//! This module owns *which examples and which dataset* a batch is made of; it
//! must not know about tensors, graphs or loss math, and it does no IO. All
//! randomness comes from lossc's seeded `bind::SplitMix64`, never from the OS
//! or a global generator, so a seed fixes every order on every platform.
//! ST uses Python's `random` and torch generators instead: orders therefore
//! differ from ST's for the same seed, while counts, ratios and shapes match.

mod ct;
mod multitask;
mod shuffle;

pub use ct::{ContrastiveTensionDataLoader, CtBatch, CtPair};
pub use multitask::{MultiTask, Sampler, Task};
