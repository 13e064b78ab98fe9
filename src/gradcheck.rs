//! Finite-difference checks of the symbolic gradient, in f64.
//!
//! For each float input, the directional derivative along several random
//! unit directions (and along every coordinate of small inputs) is estimated
//! by central differences and compared with the gradient program's dot
//! product. A point where the loss has a kink along a direction (an exact
//! tie, a hinge at zero, a zero vector) is detected, because its one-sided
//! derivatives disagree by the same amount at step h and h/10, and reported
//! as a kink rather than as an error.
//!
//! `detach` is honoured: the loss is differentiated with the detached terms
//! held at their values at the base point (a frozen copy of the forward
//! graph feeds them), which is the gradient autograd computes.

use crate::bind::{self, Bound};
use crate::interp::{self, Tensor};
use crate::ir::{Expr, Graph, NodeId, NodeKind, UnOp};
use crate::syntax::Diagnostic;
use crate::tensor_io::{HostTensor, TensorData, TensorMap};

#[derive(Clone, Debug)]
pub struct InputReport {
    pub name: String,
    /// Largest relative error over the checks that were not kinks.
    pub worst: f64,
    pub checks: usize,
    pub kinks: usize,
}

#[derive(Clone, Debug)]
pub struct Report {
    pub loss: f64,
    pub inputs: Vec<InputReport>,
    /// Whether detached terms were held constant.
    pub frozen_detach: bool,
}

pub struct Options {
    pub directions: usize,
    /// Inputs with at most this many elements are also checked coordinate by coordinate.
    pub max_coordinates: usize,
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            directions: 6,
            max_coordinates: 256,
            seed: 0,
        }
    }
}

const FROZEN: &str = "__frozen.";

/// Checks `forward`'s gradient program `with_grads` at the point `tensors`.
pub fn check(
    forward: &Graph,
    with_grads: &Graph,
    tensors: &TensorMap,
    opts: &Options,
) -> Result<Report, Vec<Diagnostic>> {
    let base = bind::bind(with_grads, tensors)?;
    let eval = interp::evaluate::<f64>(with_grads, &base).map_err(|d| vec![d])?;
    let loss = eval.outputs[0].1;
    let has_detach = forward
        .nodes
        .iter()
        .any(|n| matches!(&n.kind, NodeKind::Comp(c) if contains_detach(&c.body)));
    let objective = if has_detach {
        freeze_detached(forward)
    } else {
        forward.clone()
    };
    let mut with_frozen = tensors.clone();
    if has_detach {
        for b in &base.inputs {
            with_frozen.insert(format!("{FROZEN}{}", b.name), b.tensor.clone());
        }
    }
    let fbound = bind::bind(&objective, &with_frozen)?;
    let mut rng = crate::bind::SplitMix64::new(opts.seed ^ 0x5eed);
    let mut inputs = Vec::new();
    for (name, gnode) in &with_grads.grads {
        let Some(b) = base.inputs.iter().find(|b| &b.name == name) else {
            continue;
        };
        let Tensor::F(grad) = &eval.values[gnode.index()] else {
            continue;
        };
        let g: Vec<f64> = grad.iter().copied().collect();
        let x0 = b.tensor.to_f64_vec();
        if x0.is_empty() {
            continue;
        }
        let mut report = InputReport {
            name: name.clone(),
            worst: 0.0,
            checks: 0,
            kinks: 0,
        };
        let gnorm = g.iter().map(|v| v * v).sum::<f64>().sqrt();
        let mut dirs: Vec<Vec<f64>> = (0..opts.directions)
            .map(|_| unit(&mut rng, x0.len()))
            .collect();
        if x0.len() <= opts.max_coordinates {
            for j in 0..x0.len() {
                let mut e = vec![0.0; x0.len()];
                e[j] = 1.0;
                dirs.push(e);
            }
        }
        let scale = x0.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for v in dirs {
            let analytic: f64 = g.iter().zip(&v).map(|(a, b)| a * b).sum();
            let at = |t: f64| -> Result<f64, Vec<Diagnostic>> {
                let x: Vec<f64> = x0.iter().zip(&v).map(|(a, d)| a + t * d).collect();
                eval_at(&objective, &fbound, name, x)
            };
            let h = 1e-4 * scale;
            let (p1, m1, p2, m2) = (at(h)?, at(-h)?, at(h / 10.0)?, at(-h / 10.0)?);
            let (d1, d2) = ((p1 - m1) / (2.0 * h), (p2 - m2) / (0.2 * h));
            // One-sided derivatives differ by about h|f''| on smooth ground, shrinking
            // with h; across a kink the difference stays.
            let jump1 = ((p1 - loss) - (loss - m1)).abs() / h;
            let jump2 = ((p2 - loss) - (loss - m2)).abs() / (h / 10.0);
            let floor = 1e-7 * (gnorm + analytic.abs()) + 1e-12;
            if jump1 > floor * 10.0 && jump2 > 0.5 * jump1 {
                report.kinks += 1;
                continue;
            }
            // Richardson extrapolation cancels the h^2 error term, unless a kink lies
            // between h/10 and h, where only the short step is trusted.
            let numeric = if jump2 < 0.2 * jump1 && jump1 > 0.5 {
                d2
            } else {
                (100.0 * d2 - d1) / 99.0
            };
            let err = (numeric - analytic).abs()
                / analytic
                    .abs()
                    .max(numeric.abs())
                    .max(1e-3 * gnorm)
                    .max(1e-12);
            report.worst = report
                .worst
                .max(if err.is_nan() { f64::INFINITY } else { err });
            report.checks += 1;
        }
        inputs.push(report);
    }
    Ok(Report {
        loss,
        inputs,
        frozen_detach: has_detach,
    })
}

fn unit(rng: &mut crate::bind::SplitMix64, n: usize) -> Vec<f64> {
    let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-300);
    v.into_iter().map(|x| x / norm).collect()
}

/// The loss with one input replaced by `x`.
fn eval_at(g: &Graph, bound: &Bound, name: &str, x: Vec<f64>) -> Result<f64, Vec<Diagnostic>> {
    let mut b = bound.clone();
    if let Some(i) = b.inputs.iter_mut().find(|i| i.name == name) {
        i.tensor = HostTensor {
            shape: i.tensor.shape.clone(),
            data: TensorData::F64(x),
        };
    }
    interp::evaluate::<f64>(g, &b)
        .map(|e| e.outputs[0].1)
        .map_err(|d| vec![d])
}

fn contains_detach(e: &Expr) -> bool {
    let mut found = false;
    e.walk(&mut |x| found |= matches!(x, Expr::Unary(UnOp::Detach, _)));
    found
}

/// A graph whose detached terms read a frozen copy of the forward graph
/// (inputs `__frozen.<name>`), so that perturbing the real inputs leaves them
/// constant.
pub fn freeze_detached(g: &Graph) -> Graph {
    let n = g.nodes.len() as u32;
    let mut out = Graph {
        outputs: Vec::new(),
        grads: Vec::new(),
        ..g.without_nodes(g.nodes.len())
    };
    for node in &g.nodes {
        let mut copy = node.clone();
        if let NodeKind::Input { name, variadic } = &node.kind {
            copy.kind = NodeKind::Input {
                name: format!("{FROZEN}{name}"),
                variadic: *variadic,
            };
        }
        out.nodes.push(copy);
    }
    for node in &g.nodes {
        let mut copy = node.clone();
        let shift = |e: &Expr| -> Expr {
            e.map(&mut |x| match x {
                Expr::Read { node, at } => Expr::Read {
                    node: NodeId(node.0 + n),
                    at,
                },
                Expr::Unary(UnOp::Detach, inner) => {
                    Expr::Unary(UnOp::Detach, Box::new(unshift(&inner, n)))
                }
                other => other,
            })
        };
        match &mut copy.kind {
            NodeKind::Comp(c) => {
                c.body = shift(&c.body);
                if let Some(f) = c.reduce.as_mut().and_then(|r| r.filter.as_mut()) {
                    *f = shift(f);
                }
            }
            NodeKind::Concat { parts, .. } => parts.iter_mut().for_each(|p| p.0 += n),
            NodeKind::Slice { src, .. } | NodeKind::Reshape { src } => src.0 += n,
            NodeKind::Input { .. } => {}
        }
        out.nodes.push(copy);
    }
    out.outputs = g
        .outputs
        .iter()
        .map(|(k, id)| (k.clone(), NodeId(id.0 + n)))
        .collect();
    out
}

/// Inside `detach(..)`, reads go back to the frozen copy (ids below `n`).
fn unshift(e: &Expr, n: u32) -> Expr {
    e.map(&mut |x| match x {
        Expr::Read { node, at } if node.0 >= n => Expr::Read {
            node: NodeId(node.0 - n),
            at,
        },
        other => other,
    })
}
