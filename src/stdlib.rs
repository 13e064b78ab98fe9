//! The standard library, embedded in the binary: the prelude and one file per
//! loss from `losses/`. A test checks that every `losses/*.loss` is listed.

pub const FILES: &[(&str, &str)] = &[
    ("prelude.loss", include_str!("../losses/prelude.loss")),
    (
        "ContrastiveLoss.loss",
        include_str!("../losses/ContrastiveLoss.loss"),
    ),
    ("CoSENTLoss.loss", include_str!("../losses/CoSENTLoss.loss")),
    (
        "CosineSimilarityLoss.loss",
        include_str!("../losses/CosineSimilarityLoss.loss"),
    ),
    (
        "MultipleNegativesRankingLoss.loss",
        include_str!("../losses/MultipleNegativesRankingLoss.loss"),
    ),
    (
        "TripletLoss.loss",
        include_str!("../losses/TripletLoss.loss"),
    ),
];
