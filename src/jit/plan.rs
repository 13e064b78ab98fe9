//! What a comprehension becomes before any code is emitted: its loop levels,
//! its scalar body hash-consed into a DAG of terms, the runtime dims it needs,
//! and the proofs that let a read skip its bounds check.
//!
//! * Loop levels: the output indices first (level 0 is the outermost), then
//!   the reduced indices. Each level has an extent, a symbolic `Dim`.
//! * Terms: every distinct sub-expression of the body and filter once, with
//!   its runtime type (the interpreter's, which is not always `Expr::dtype`:
//!   `detach` of an int is a float, `/` of two ints is the int 0), its *level*
//!   (the innermost loop level it depends on, -1 for none) and whether it is
//!   *safe* (can never raise a runtime error: no checked read, no integer
//!   division). Safe terms may be evaluated early, once per iteration of the
//!   outermost loop they depend on; unsafe ones are evaluated exactly where
//!   and when the interpreter evaluates them, so the first error is the same.
//! * Proofs: a read index that is a loop variable (or a constant) is not
//!   checked in generated code when its range is inside the read dim. Each
//!   such proof is kept as `(bound, dim)` and verified numerically before the
//!   kernel runs; where one fails, the run hands the node to the interpreter
//!   (`run`), which gives exactly its values or its error. So an unchecked
//!   read can never go out of bounds. Some proofs hold symbolically (`dim -
//!   extent` has no negative coefficient: `t < D` reading a dim `D`). The
//!   others are assumed, which pays when they hold at every size a program
//!   meets (`t < 384` reading a dim `D` that is 384 or more; Matryoshka's
//!   truncations), and is not made where the program itself guards the index
//!   (`if t < 48 then x[t]`, a filter `j != i`): there the proof fails on
//!   every run, so the read is checked element by element instead.

use crate::ir::{BinOp, Dim, Expr, Graph, IdxVar, NodeId, UnOp};
use std::collections::HashMap;

/// The runtime type of a scalar: the float of the compiled precision, i64,
/// or a bool held as an i8 that is 0 or 1.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub(super) enum Ty {
    F,
    I,
    B,
}

impl Ty {
    pub fn of(d: crate::ir::DType) -> Ty {
        match d {
            crate::ir::DType::Float => Ty::F,
            crate::ir::DType::Int => Ty::I,
            crate::ir::DType::Bool => Ty::B,
        }
    }
}

/// One scalar operation; operands are term ids (always smaller than the
/// term's own id, so ids are a topological order).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub(super) enum Op {
    /// The bits of an f64 constant.
    Float(u64),
    Int(i64),
    Bool(bool),
    Index(IdxVar),
    /// A slot of the dim table.
    Size(usize),
    Read(NodeId, Vec<usize>),
    Unary(UnOp, usize),
    Binary(BinOp, usize, usize),
    Select(usize, usize, usize),
}

#[derive(Clone, Debug)]
pub(super) struct Term {
    pub op: Op,
    pub ty: Ty,
    /// The innermost loop level the term depends on; -1 for none.
    pub level: i32,
    /// Evaluating the term can never raise an error.
    pub safe: bool,
    /// For reads: which index positions are checked at run time.
    pub checked: Vec<bool>,
}

impl Term {
    /// Leaves cost nothing to recompute: they are never hoisted on their own.
    pub fn is_leaf(&self) -> bool {
        matches!(
            self.op,
            Op::Float(_) | Op::Int(_) | Op::Bool(_) | Op::Index(_)
        )
    }
}

/// The symbolic dims a graph's kernels read at run time, each once. `run`
/// evaluates them all (`Dim::eval`, unknown as 0) into the array every kernel
/// receives.
#[derive(Clone, Debug, Default)]
pub(super) struct DimTable {
    pub dims: Vec<Dim>,
    index: HashMap<Dim, usize>,
}

impl DimTable {
    pub fn slot(&mut self, d: &Dim) -> usize {
        if let Some(s) = self.index.get(d) {
            return *s;
        }
        self.dims.push(d.clone());
        self.index.insert(d.clone(), self.dims.len() - 1);
        self.dims.len() - 1
    }
}

/// An unchecked read index stays in range when `dim >= max(bound, 0)`.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Proof {
    pub bound: Dim,
    pub dim: Dim,
}

/// The hash-consed body (and filter) of one comprehension.
#[derive(Debug, Default)]
pub(super) struct Dag {
    pub terms: Vec<Term>,
    index: HashMap<(Op, Vec<bool>), usize>,
}

/// Everything about a comprehension's loops the DAG builder needs.
pub(super) struct Loops<'a> {
    /// `(variable, extent)` per level, outermost first.
    pub levels: &'a [(IdxVar, Dim)],
}

impl Loops<'_> {
    fn level(&self, v: IdxVar) -> Option<usize> {
        self.levels.iter().position(|(w, _)| *w == v)
    }
}

pub(super) struct Builder<'a> {
    pub graph: &'a Graph,
    pub loops: Loops<'a>,
    pub dims: &'a mut DimTable,
    pub proofs: &'a mut Vec<Proof>,
    pub dag: Dag,
    /// Loop variables whose value an enclosing `if` condition or the
    /// reduction's filter uses (reads indexed by them are not assumed in
    /// range), and how many such conditions enclose the term being added.
    pub guards: Vec<IdxVar>,
    pub conditional: usize,
}

/// The loop variables `e` uses as values (not only as read indices): those
/// a condition can compare against a bound.
pub(super) fn value_vars(e: &Expr, out: &mut Vec<IdxVar>) {
    match e {
        Expr::Index(v) => out.push(*v),
        Expr::Read { .. } => {}
        Expr::Unary(_, a) => value_vars(a, out),
        Expr::Binary(_, a, b) => {
            value_vars(a, out);
            value_vars(b, out);
        }
        Expr::Select(c, a, b) => {
            value_vars(c, out);
            value_vars(a, out);
            value_vars(b, out);
        }
        Expr::Float(_) | Expr::Int(_) | Expr::Bool(_) | Expr::Size(_) => {}
    }
}

impl Builder<'_> {
    pub fn add(&mut self, e: &Expr) -> usize {
        match e {
            Expr::Float(x) => self.intern(Op::Float(x.to_bits()), Ty::F, -1, true, vec![]),
            Expr::Int(n) => self.intern(Op::Int(*n), Ty::I, -1, true, vec![]),
            Expr::Bool(b) => self.intern(Op::Bool(*b), Ty::B, -1, true, vec![]),
            Expr::Index(v) => {
                let level = self.loops.level(*v).map_or(-1, |l| l as i32);
                self.intern(Op::Index(*v), Ty::I, level, true, vec![])
            }
            Expr::Size(d) => {
                let slot = self.dims.slot(d);
                self.intern(Op::Size(slot), Ty::I, -1, true, vec![])
            }
            Expr::Read { node, at } => {
                let read_shape = self.graph.node(*node).shape.clone();
                let mut ids = Vec::with_capacity(at.len());
                let mut checked = Vec::with_capacity(at.len());
                let mut level = -1;
                let mut safe = true;
                for (k, ix) in at.iter().enumerate() {
                    let id = self.add(ix);
                    level = level.max(self.dag.terms[id].level);
                    safe &= self.dag.terms[id].safe;
                    let proven = match read_shape.get(k) {
                        Some(dim) => self.prove(id, dim),
                        None => false,
                    };
                    safe &= proven;
                    checked.push(!proven);
                    ids.push(id);
                }
                for d in &read_shape {
                    self.dims.slot(d);
                }
                let ty = Ty::of(self.graph.node(*node).dtype);
                self.intern(Op::Read(*node, ids), ty, level, safe, checked)
            }
            Expr::Unary(op, a) => {
                let a = self.add(a);
                let t = &self.dag.terms[a];
                let ty = unary_ty(*op, t.ty);
                let (level, safe) = (t.level, t.safe);
                self.intern(Op::Unary(*op, a), ty, level, safe, vec![])
            }
            Expr::Binary(op, a, b) => {
                let a = self.add(a);
                let b = self.add(b);
                let (ta, tb) = (&self.dag.terms[a], &self.dag.terms[b]);
                let ty = binary_ty(*op, ta.ty, tb.ty);
                let level = ta.level.max(tb.level);
                let divides =
                    ta.ty == Ty::I && tb.ty == Ty::I && matches!(op, BinOp::Rem | BinOp::FloorDiv);
                let safe = ta.safe && tb.safe && ta.ty == tb.ty && !divides;
                self.intern(Op::Binary(*op, a, b), ty, level, safe, vec![])
            }
            Expr::Select(c_expr, a, b) => {
                let c = self.add(c_expr);
                let (guards, conditional) = (self.guards.len(), self.conditional);
                value_vars(c_expr, &mut self.guards);
                self.conditional += 1;
                let a = self.add(a);
                let b = self.add(b);
                self.guards.truncate(guards);
                self.conditional = conditional;
                let t = &self.dag.terms;
                let ty = t[a].ty;
                let level = t[c].level.max(t[a].level).max(t[b].level);
                let safe = t[c].safe && t[a].safe && t[b].safe;
                self.intern(Op::Select(c, a, b), ty, level, safe, vec![])
            }
        }
    }

    /// Whether index term `id` can go unchecked: always inside `0 .. dim`
    /// symbolically, or assumed so (module doc).
    fn prove(&mut self, id: usize, dim: &Dim) -> bool {
        let (bound, guarded) = match self.dag.terms[id].op {
            Op::Index(v) => match self.loops.level(v) {
                Some(l) => (self.loops.levels[l].1.clone(), self.guards.contains(&v)),
                // An unbound variable reads as 0.
                None => (Dim::lit(1), self.conditional > 0),
            },
            Op::Int(c) if c >= 0 => (Dim::lit(c + 1), self.conditional > 0),
            // A loop variable plus a constant, `k + 96`: below extent + 96.
            Op::Binary(BinOp::Add, a, b) => {
                let (ta, tb) = (&self.dag.terms[a].op, &self.dag.terms[b].op);
                let ((Op::Index(v), Op::Int(c)) | (Op::Int(c), Op::Index(v))) = (ta, tb) else {
                    return false;
                };
                let (v, c) = (*v, *c);
                match self.loops.level(v) {
                    Some(l) if c >= 0 => (
                        self.loops.levels[l].1.add(&Dim::lit(c)),
                        self.guards.contains(&v),
                    ),
                    _ => return false,
                }
            }
            _ => return false,
        };
        if guarded && !dim.sub(&bound).is_non_negative() {
            return false;
        }
        let proof = Proof {
            bound,
            dim: dim.clone(),
        };
        if !self.proofs.contains(&proof) {
            self.proofs.push(proof);
        }
        true
    }

    fn intern(&mut self, op: Op, ty: Ty, level: i32, safe: bool, checked: Vec<bool>) -> usize {
        // A read checked under one guard and not under another is two terms.
        let key = (op, checked);
        if let Some(id) = self.dag.index.get(&key) {
            return *id;
        }
        let (op, checked) = key.clone();
        self.dag.terms.push(Term {
            op: op.clone(),
            ty,
            level,
            safe,
            checked,
        });
        let id = self.dag.terms.len() - 1;
        self.dag.index.insert(key, id);
        id
    }
}

/// The interpreter's result type of a unary operation.
pub(super) fn unary_ty(op: UnOp, a: Ty) -> Ty {
    match (op, a) {
        (UnOp::Neg | UnOp::Abs, Ty::I) => Ty::I,
        (UnOp::Not, _) => Ty::B,
        _ => Ty::F,
    }
}

/// The interpreter's result type of a binary operation (mixed operands are a
/// runtime error; their type is nominally float).
pub(super) fn binary_ty(op: BinOp, a: Ty, b: Ty) -> Ty {
    match (a, b) {
        (Ty::I, Ty::I) if op.is_comparison() => Ty::B,
        (Ty::I, Ty::I) => Ty::I,
        (Ty::B, Ty::B) => Ty::B,
        (Ty::F, Ty::F) if op.is_comparison() => Ty::B,
        _ => Ty::F,
    }
}
