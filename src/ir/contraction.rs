//! Which comprehensions are contractions `out[(b,) i, j] = sum(k) A[..] * B[..]`
//! over plain index variables — the shape a backend hands to a GEMM (the
//! JIT's `gemm.rs`) or to a tiled kernel (the CUDA backend's).
//!
//! The rule: a `Sum` over exactly one variable `k` with no filter, two or
//! three output indices (`i, j`, or a batch `b, i, j`), and a body that is
//! exactly the product of two float reads whose indices are distinct plain
//! variables, one covering `{i, k}` and the other `{j, k}` (plus `b` in both
//! for a batch), in any order — transposed operands are strides, nothing is
//! copied.

use super::{BinOp, Comp, DType, Dim, Expr, Graph, IdxVar, NodeId, RedOp};

/// What each index of an operand read is bound to; the discriminant is the
/// position in a stride triple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Batch = 0,
    /// The output row index `i` (A) or column index `j` (B).
    Outer = 1,
    K = 2,
}

#[derive(Clone, Debug)]
pub struct Operand {
    pub node: NodeId,
    /// One role per dim of `node`.
    pub roles: Vec<Role>,
}

/// A comprehension recognised as `C[b] = A[b] · B[b]`.
#[derive(Clone, Debug)]
pub struct Contraction {
    pub batched: bool,
    /// Covers `{i, k}`: the left factor, `m × k`.
    pub a: Operand,
    /// Covers `{j, k}`: the right factor, `k × n`.
    pub b: Operand,
    pub k: Dim,
    pub empty: f64,
}

fn roles(at: &[Expr], outer: IdxVar, k: IdxVar, batch: Option<IdxVar>) -> Option<Vec<Role>> {
    let mut roles = Vec::with_capacity(at.len());
    for e in at {
        let Expr::Index(v) = e else { return None };
        let role = if *v == outer {
            Role::Outer
        } else if *v == k {
            Role::K
        } else if Some(*v) == batch {
            Role::Batch
        } else {
            return None;
        };
        if roles.contains(&role) {
            return None;
        }
        roles.push(role);
    }
    let want = 2 + usize::from(batch.is_some());
    (roles.len() == want).then_some(roles)
}

/// The contraction a comprehension computes, if it is one (module doc).
pub fn recognise(graph: &Graph, comp: &Comp, dtype: DType) -> Option<Contraction> {
    let r = comp.reduce.as_ref()?;
    if dtype != DType::Float || r.op != RedOp::Sum || r.filter.is_some() || r.over.len() != 1 {
        return None;
    }
    let (k, kdim) = r.over[0].clone();
    let (batch, i, j) = match comp.indices[..] {
        [i, j] => (None, i, j),
        [b, i, j] => (Some(b), i, j),
        _ => return None,
    };
    if i == j
        || Some(i) == batch
        || Some(j) == batch
        || [Some(i), Some(j), batch].contains(&Some(k))
    {
        return None;
    }
    let Expr::Binary(BinOp::Mul, x, y) = &comp.body else {
        return None;
    };
    let read = |e: &Expr| match e {
        Expr::Read { node, at } if graph.node(*node).dtype == DType::Float => {
            Some((*node, at.clone()))
        }
        _ => None,
    };
    let ((xn, xa), (yn, ya)) = (read(x)?, read(y)?);
    let (a, b) = if let (Some(ra), Some(rb)) = (roles(&xa, i, k, batch), roles(&ya, j, k, batch)) {
        ((xn, ra), (yn, rb))
    } else {
        let rb = roles(&xa, j, k, batch)?;
        let ra = roles(&ya, i, k, batch)?;
        ((yn, ra), (xn, rb))
    };
    Some(Contraction {
        batched: batch.is_some(),
        a: Operand {
            node: a.0,
            roles: a.1,
        },
        b: Operand {
            node: b.0,
            roles: b.1,
        },
        k: kdim,
        empty: r.empty,
    })
}
