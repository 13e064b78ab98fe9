//! SIMD for the innermost loop: when every term that varies along it can be
//! computed lane-wise, the kernel first runs that loop `LANES` elements at a
//! time (128-bit vectors: four f32 or two f64), then finishes the last
//! `< LANES` elements with the scalar code.
//!
//! * What vectorises (`analyse`): an elementwise node, or a `sum`/`mean`
//!   whose filter (if any) depends on output indices only, whose innermost
//!   terms are float arithmetic, comparisons, `if`, the math functions, and
//!   reads whose last index is the innermost variable (contiguous) and whose
//!   other indices do not vary along it. Terms that do not vary along the
//!   innermost loop stay scalar and are broadcast.
//! * Same values as the scalar code, lane by lane: the same operations in
//!   the same precision, NaN-propagating max/min as `translate_nan_extreme`,
//!   math functions through the same helpers (called per lane). An `if`
//!   whose condition varies per lane computes both branches and blends them
//!   when both are safe (cannot raise an error); with an invariant condition
//!   it stays a branch.
//! * A step may hand the rest of its row to the scalar loop (*bail*; not in
//!   a column sum): before anything of the step is stored or accumulated, it
//!   leaves the vector loop with the counter at its first element. It does
//!   so when a checked read is out of range in some lane, and when an `if`
//!   whose side can fail (a guarded read, `if j < 48 then g[i, j]`) has
//!   lanes going both ways; an `if` whose lanes all agree runs that side
//!   alone. So such kernels vectorise, run in lanes up to the step where the
//!   guard changes, and the scalar code raises any error in the
//!   interpreter's order.
//! * A vectorised `sum` adds `LANES` running partial sums and folds them at
//!   the end: the summation order differs from the interpreter's, so its
//!   values agree to the rounding of a sum (`JitProgram::reordered_nodes`).
//!   A vectorised `logsumexp` keeps a running maximum per lane (NaN ignored,
//!   as the scalar pass), folds the lanes into the scalar maximum, then sums
//!   `exp(x - m)` in lanes the same way. A vectorised `max`/`min` keeps the
//!   scalar rule per lane (strictly better, or a NaN over a number) and folds
//!   the lanes by it: the same value, except that among equal extremes the
//!   sign of a zero may come from another element than the first.

use super::super::plan::{Dag, Op, Ty};
use super::super::Precision;
use super::{Kernel, Translator};
use crate::ir::{BinOp, DType, RedOp, UnOp};
use crate::jit::helpers::Math;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, BlockArg, InstBuilder, MemFlagsData, Type, Value};
use std::collections::HashMap;

/// Independent partial sums of a vectorised fold (`translate_vector_fold`).
const FOLD_UNROLL: i64 = 4;
/// Vectors of columns a column sum computes side by side.
pub(super) const COLUMN_WIDTH: usize = 4;

/// Vector loads and stores: no trap (every access is in bounds, as for the
/// scalar code), but no alignment promised.
const VEC_FLAGS: MemFlagsData = MemFlagsData::new().with_notrap();

/// How the innermost loop runs vectorised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::jit) enum VectorLoop {
    /// The innermost output index: `LANES` output elements per step.
    Elementwise,
    /// The innermost reduced index of a float `sum` or `mean`.
    Sum,
    /// The innermost reduced index of a `logsumexp`: both passes (the
    /// maximum, then the sum of shifted exponentials) run in lanes.
    LogSumExp,
    /// The innermost reduced index of a float `max` or `min`: a running
    /// extreme per lane, folded by the scalar rule.
    Extreme,
    /// `min(j | filter) j`: the filter's lanes, until a step where one
    /// passes (`Translator::translate_first`).
    First,
    /// The last output index of a float `sum`/`mean` whose innermost loop
    /// does not vectorise (a column sum, `sum(i) x[i, c]`): `LANES` outputs
    /// at a time, each lane its own accumulator, the reduced loops inside.
    Column,
}

/// What `analyse` decided: how, along which loop level, and which terms
/// vary along it (those are computed per lane; the rest as scalars).
pub(in crate::jit) struct Plan {
    pub how: VectorLoop,
    pub level: usize,
    pub varies: Vec<bool>,
}

/// The vector types of a precision.
#[derive(Clone, Copy)]
pub(super) struct Lanes {
    /// `F32X4` or `F64X2`.
    pub float: Type,
    /// The lane masks comparisons give: `I32X4` or `I64X2`.
    pub mask: Type,
    /// The integer type of one mask lane.
    pub lane_int: Type,
    pub n: u8,
}

impl Lanes {
    pub fn of(p: Precision) -> Lanes {
        match p {
            Precision::F32 => Lanes {
                float: types::F32X4,
                mask: types::I32X4,
                lane_int: types::I32,
                n: 4,
            },
            Precision::F64 => Lanes {
                float: types::F64X2,
                mask: types::I64X2,
                lane_int: types::I64,
                n: 2,
            },
        }
    }
}

/// Whether (and how) the kernel vectorises: its innermost loop, else (a
/// column sum) its last output loop.
pub(in crate::jit) fn analyse(k: &Kernel) -> Option<Plan> {
    let inner = k.levels.len().checked_sub(1)?;
    let body = k.body?;
    if let Some(plan) = first(k, inner, body) {
        return Some(plan);
    }
    if k.dag.terms[body].ty != Ty::F || k.dtype != DType::Float {
        return None;
    }
    innermost(k, inner, body).or_else(|| column(k, body))
}

/// `min(j | filter) j` over the innermost (and only reduced) level, the
/// filter safe and lane-wise: its lanes searched for the first that passes.
fn first(k: &Kernel, inner: usize, body: usize) -> Option<Plan> {
    let r = k.comp.reduce.as_ref()?;
    let n_out = k.comp.indices.len();
    let var = k.levels[inner].0;
    if r.op != RedOp::Min
        || r.over.len() != 1
        || inner != n_out
        || k.ranged_red.is_some()
        || k.dag.terms[body].op != Op::Index(var)
    {
        return None;
    }
    let f = masked_filter(k.dag, k.filter, n_out)?;
    let varies = varying(k.dag, var);
    (k.dag.terms[f].safe && Check::new(k, var, &varies, false).lane_wise(f)).then_some(Plan {
        how: VectorLoop::First,
        level: inner,
        varies,
    })
}

/// Which terms depend on loop variable `var`.
fn varying(dag: &Dag, var: crate::ir::IdxVar) -> Vec<bool> {
    let mut v: Vec<bool> = Vec::with_capacity(dag.terms.len());
    for t in &dag.terms {
        let any = |ids: &[usize]| ids.iter().any(|i| v[*i]);
        let x = match &t.op {
            Op::Index(w) => *w == var,
            Op::Read(_, at) => any(at),
            Op::Unary(_, a) => v[*a],
            Op::Binary(_, a, b) => v[*a] || v[*b],
            Op::Select(c, a, b) => v[*c] || v[*a] || v[*b],
            Op::Float(_) | Op::Int(_) | Op::Bool(_) | Op::Size(_) => false,
        };
        v.push(x);
    }
    v
}

/// A column sum: the last output index in lanes, for a float `sum`/`mean`
/// whose filter (if any) does not vary along it.
fn column(k: &Kernel, body: usize) -> Option<Plan> {
    let r = k.comp.reduce.as_ref()?;
    let n_out = k.comp.indices.len();
    if n_out == 0
        || !matches!(r.op, RedOp::Sum | RedOp::Mean)
        || !k.also.is_empty()
        || k.column.is_some()
    {
        return None;
    }
    let level = n_out - 1;
    let var = k.levels[level].0;
    let varies = varying(k.dag, var);
    if k.filter.is_some_and(|f| varies[f]) || !varies[body] {
        return None;
    }
    Check::new(k, var, &varies, false)
        .lane_wise(body)
        .then_some(())?;
    Some(Plan {
        how: VectorLoop::Column,
        level,
        varies,
    })
}

/// The innermost loop in lanes.
fn innermost(k: &Kernel, inner: usize, body: usize) -> Option<Plan> {
    let n_out = k.comp.indices.len();
    let how = match &k.comp.reduce {
        None => VectorLoop::Elementwise,
        Some(r) => {
            if inner < n_out {
                return None;
            }
            match r.op {
                RedOp::Sum | RedOp::Mean => VectorLoop::Sum,
                RedOp::LogSumExp => VectorLoop::LogSumExp,
                RedOp::Max | RedOp::Min => VectorLoop::Extreme,
                _ => return None,
            }
        }
    };
    let var = k.levels[inner].0;
    let varies = varying(k.dag, var);
    let mut check = Check::new(k, var, &varies, true);
    let also_ok = k
        .also
        .iter()
        .chain(&k.column)
        .all(|(_, t)| k.dag.terms[*t].ty == Ty::F && check.lane_wise(*t));
    let lanes_ok = also_ok
        && check.lane_wise(body)
        && masked_filter(k.dag, k.filter, n_out).is_none_or(|f| {
            // Every lane evaluates filter and body, passing or not.
            k.dag.terms[f].safe && k.dag.terms[body].safe && check.lane_wise(f)
        });
    lanes_ok.then_some(Plan {
        how,
        level: inner,
        varies,
    })
}

/// The filter vector code applies as a mask per lane: any filter except one
/// over output indices only, which the scalar code decides once per output
/// element before the reduced loops (`translate_fold`).
pub(super) fn masked_filter(dag: &Dag, filter: Option<usize>, n_out: usize) -> Option<usize> {
    filter.filter(|f| {
        let t = &dag.terms[*f];
        !(t.safe && t.level < n_out as i32)
    })
}

/// The lane-wise check of the terms that vary along the vector loop.
struct Check<'a> {
    dag: &'a Dag,
    varies: &'a [bool],
    var: crate::ir::IdxVar,
    graph: &'a crate::ir::Graph,
    seen: HashMap<usize, bool>,
    /// A vector step may hand the rest of the row to the scalar code (not in
    /// a column sum, whose lanes are outputs): then a checked read and an
    /// `if` whose sides can fail vectorise too (`translate_vselect`).
    bail: bool,
}

/// Which operand of an integer comparison is the vector loop's index (the
/// other does not vary along the loop): `Some(true)` for the left.
fn index_side(
    dag: &Dag,
    varies: &[bool],
    var: crate::ir::IdxVar,
    a: usize,
    b: usize,
) -> Option<bool> {
    side(dag, varies, a, b, |t| dag.terms[t].op == Op::Index(var))
}

/// Which operand of an integer `==`/`!=` is a contiguous read of an int node
/// along the vector loop (labels, `labels[j] == labels[i]`), the other not
/// varying along it: `Some(true)` for the left.
fn int_read_side(
    dag: &Dag,
    varies: &[bool],
    var: crate::ir::IdxVar,
    a: usize,
    b: usize,
) -> Option<bool> {
    side(dag, varies, a, b, |t| {
        dag.terms[t].ty == Ty::I && contiguous_read(dag, varies, var, t, false)
    })
}

/// `Some(true)` when `a` is `wanted` and `b` an int that does not vary along
/// the vector loop, `Some(false)` the other way round.
fn side(
    dag: &Dag,
    varies: &[bool],
    a: usize,
    b: usize,
    wanted: impl Fn(usize) -> bool,
) -> Option<bool> {
    let invariant = |t: usize| !varies[t] && dag.terms[t].ty == Ty::I;
    if wanted(a) && invariant(b) {
        Some(true)
    } else if wanted(b) && invariant(a) {
        Some(false)
    } else {
        None
    }
}

/// `Some(c)` when index term `t` is the vector loop's variable plus a
/// constant `c >= 0` (`k`, `k + 96`: a block of a wider row).
pub(super) fn lane_offset(dag: &Dag, var: crate::ir::IdxVar, t: usize) -> Option<i64> {
    match &dag.terms[t].op {
        Op::Index(v) if *v == var => Some(0),
        Op::Binary(BinOp::Add, a, b) => match (&dag.terms[*a].op, &dag.terms[*b].op) {
            (Op::Index(v), Op::Int(c)) | (Op::Int(c), Op::Index(v)) if *v == var && *c >= 0 => {
                Some(*c)
            }
            _ => None,
        },
        _ => None,
    }
}

/// A read whose last index is the vector loop's variable (plus a constant) (unchecked, unless
/// `checked_ok`), and whose other indices do not vary along it: its lanes
/// are contiguous.
fn contiguous_read(
    dag: &Dag,
    varies: &[bool],
    var: crate::ir::IdxVar,
    t: usize,
    checked_ok: bool,
) -> bool {
    let Op::Read(_, at) = &dag.terms[t].op else {
        return false;
    };
    at.len().checked_sub(1).is_some_and(|l| {
        lane_offset(dag, var, at[l]).is_some()
            && (checked_ok || !dag.terms[t].checked[l])
            && at[..l].iter().all(|ix| !varies[*ix])
    })
}

impl<'a> Check<'a> {
    fn new(k: &Kernel<'a>, var: crate::ir::IdxVar, varies: &'a [bool], bail: bool) -> Check<'a> {
        Check {
            dag: k.dag,
            varies,
            var,
            graph: k.graph,
            seen: HashMap::new(),
            bail,
        }
    }

    fn index_comparison(&self, a: usize, b: usize) -> Option<bool> {
        index_side(self.dag, self.varies, self.var, a, b)
    }

    fn int_read_comparison(&self, a: usize, b: usize) -> Option<bool> {
        int_read_side(self.dag, self.varies, self.var, a, b)
    }

    fn lane_wise(&mut self, id: usize) -> bool {
        let t = &self.dag.terms[id];
        if !self.varies[id] {
            return true; // scalar, broadcast
        }
        if let Some(ok) = self.seen.get(&id) {
            return *ok;
        }
        let terms = &self.dag.terms;
        let ok = match &t.op {
            Op::Read(node, _) => {
                t.ty == Ty::F
                    && self.graph.node(*node).dtype == DType::Float
                    && contiguous_read(self.dag, self.varies, self.var, id, self.bail)
            }
            Op::Unary(op, a) => {
                let ta = terms[*a].ty;
                let op_ok = match op {
                    UnOp::Not => ta == Ty::B,
                    UnOp::ToFloat => ta != Ty::I,
                    UnOp::Detach => ta == Ty::F,
                    _ => ta == Ty::F,
                };
                op_ok && self.lane_wise(*a)
            }
            Op::Binary(op, a, b) => {
                let (ta, tb) = (terms[*a].ty, terms[*b].ty);
                let op_ok = match (ta, tb) {
                    (Ty::F, Ty::F) => {
                        !matches!(op, BinOp::Rem | BinOp::FloorDiv | BinOp::And | BinOp::Or)
                    }
                    (Ty::B, Ty::B) => {
                        matches!(op, BinOp::And | BinOp::Or | BinOp::Eq | BinOp::Ne)
                    }
                    // The innermost index against an integer that does not
                    // vary along the loop (a diagonal, `j == i`).
                    (Ty::I, Ty::I) => {
                        return op.is_comparison() && self.index_comparison(*a, *b).is_some()
                            || matches!(op, BinOp::Eq | BinOp::Ne)
                                && self.int_read_comparison(*a, *b).is_some();
                    }
                    _ => false,
                };
                op_ok && self.lane_wise(*a) && self.lane_wise(*b)
            }
            Op::Select(c, a, b) => {
                let (tc, ta, tb) = (terms[*c].ty, terms[*a].ty, terms[*b].ty);
                let per_lane = self.varies[*c];
                matches!(t.ty, Ty::F | Ty::B)
                    && ta == t.ty
                    && tb == t.ty
                    && tc != Ty::I
                    && (!per_lane || self.bail || (terms[*a].safe && terms[*b].safe))
                    && self.lane_wise(*c)
                    && self.lane_wise(*a)
                    && self.lane_wise(*b)
            }
            // The innermost index as a value (not a read's last index), and
            // anything else varying per lane.
            _ => false,
        };
        self.seen.insert(id, ok);
        ok
    }
}

impl Translator<'_, '_> {
    /// `for i in start.. while i + LANES <= end { inner; i += LANES }` over
    /// the innermost level, leaving `i` at the first element it did not do
    /// (the scalar loop resumes from there).
    pub(super) fn translate_vector_loop(&mut self, level: usize, inner: &mut dyn FnMut(&mut Self)) {
        let start = self.bounds[level].0;
        self.b.def_var(self.loop_vars[level], start);
        self.translate_unrolled_loop(level, 1, &mut |t, _| inner(t));
    }

    /// `translate_vector_loop` from the counter's current value, `unroll`
    /// vector steps per iteration (`inner` gets the step's number; the
    /// counter advances `LANES` between steps), while all of them fit.
    fn translate_unrolled_loop(
        &mut self,
        level: usize,
        unroll: i64,
        inner: &mut dyn FnMut(&mut Self, i64),
    ) {
        self.translate_strided_loop(level, unroll, 1, inner);
    }

    /// The loop under `translate_unrolled_loop` and `translate_column_steps`:
    /// from the counter's current value, `steps` calls of `inner` per
    /// iteration, each in its own scope and followed by advancing the
    /// counter `width` vectors, while all of them fit.
    fn translate_strided_loop(
        &mut self,
        level: usize,
        steps: i64,
        width: i64,
        inner: &mut dyn FnMut(&mut Self, i64),
    ) {
        let var = self.loop_vars[level];
        let end = self.bounds[level].1;
        let n = i64::from(self.lanes.n) * width;
        let unroll = steps;
        let header = self.b.create_block();
        let body = self.b.create_block();
        let exit = self.b.create_block();
        let outer_bail = self.bail;
        if self.vector != Some(VectorLoop::Column) {
            self.bail = Some(exit);
        }
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let i = self.b.use_var(var);
        let next = self.b.ins().iadd_imm_s(i, n * unroll);
        let fits = self.b.ins().icmp(IntCC::SignedLessThanOrEqual, next, end);
        self.b.ins().brif(fits, body, &[], exit, &[]);
        self.b.switch_to_block(body);
        self.b.seal_block(body);
        for u in 0..unroll {
            self.memo.push(HashMap::new());
            self.vmemo.push(HashMap::new());
            inner(self, u);
            self.vmemo.pop();
            self.memo.pop();
            let i = self.b.use_var(var);
            let next = self.b.ins().iadd_imm_s(i, n);
            self.b.def_var(var, next);
        }
        self.b.ins().jump(header, &[]);
        self.b.seal_block(header);
        self.b.switch_to_block(exit);
        self.b.seal_block(exit);
        self.bail = outer_bail;
    }

    /// Leaves the vector loop when `cond` holds: the counter still at this
    /// step's first element, nothing of the step stored or accumulated, so
    /// the scalar loop does the rest of the row (and raises any error in the
    /// interpreter's order).
    fn bail_if(&mut self, cond: Value) {
        let bail = self
            .bail
            .expect("`analyse` vectorised a step that can bail");
        let go_on = self.b.create_block();
        self.b.ins().brif(cond, bail, &[], go_on, &[]);
        self.b.seal_block(go_on);
        self.b.switch_to_block(go_on);
    }

    /// One vector step of an elementwise kernel: `LANES` outputs stored at
    /// the running position.
    pub(super) fn translate_vector_point(&mut self) {
        let body = self.body.expect("a vectorised kernel has a body");
        let v = self.translate_vexpr(body);
        // Every member's lanes before any store: a step that bails stores
        // nothing.
        let more: Vec<(Value, Value)> = (0..self.also.len())
            .map(|k| {
                let (base, body) = self.also[k];
                (base, self.translate_vexpr(body))
            })
            .collect();
        let pos = self.b.use_var(self.out_pos);
        let addr = self.element_addr(self.out_base, pos, Ty::F);
        self.b.ins().store(VEC_FLAGS, v, addr, 0);
        for (base, v) in more {
            let addr = self.element_addr(base, pos, Ty::F);
            self.b.ins().store(VEC_FLAGS, v, addr, 0);
        }
        let next = self.b.ins().iadd_imm_s(pos, i64::from(self.lanes.n));
        self.b.def_var(self.out_pos, next);
    }

    /// One vector step of a column sum: `LANES` outputs, each lane's
    /// accumulator summing over the reduced loops (scalar loops, the filter,
    /// which does not vary along the lanes, a branch as in the scalar code),
    /// then mean and the empty value as `translate_reduce`; or, in an
    /// accumulating kernel, the sums added to the output and the count to
    /// each lane's count (`translate_accumulate`).
    pub(super) fn translate_vector_column_point(&mut self, width: usize) {
        let body = self.body.expect("a column sum has a body");
        let r = self
            .comp
            .reduce
            .as_ref()
            .expect("a column sum is a reduction");
        let n_lanes = i64::from(self.lanes.n);
        let cvar = self.loop_vars[self.vlevel];
        let zeros = self.splat_float(0.0);
        let partials: Vec<cranelift_frontend::Variable> = (0..width)
            .map(|_| {
                let v = self.b.declare_var(self.lanes.float);
                self.b.def_var(v, zeros);
                v
            })
            .collect();
        let count = self.b.declare_var(types::I64);
        let zero = self.b.ins().iconst(types::I64, 0);
        self.b.def_var(count, zero);
        self.translate_column_loops(self.n_out(), &mut |t| {
            t.translate_filtered(&mut |t| {
                // `width` vectors of columns side by side: the counter moves
                // a vector at a time and comes back; terms that do not vary
                // along the columns are computed once for all of them.
                let c0 = t.b.use_var(cvar);
                for (u, var) in partials.iter().enumerate() {
                    if u > 0 {
                        let c = t.b.ins().iadd_imm_s(c0, u as i64 * n_lanes);
                        t.b.def_var(cvar, c);
                    }
                    t.vmemo.push(HashMap::new());
                    let x = t.translate_vexpr(body);
                    t.vmemo.pop();
                    let p = t.b.use_var(*var);
                    let p = t.b.ins().fadd(p, x);
                    t.b.def_var(*var, p);
                }
                t.b.def_var(cvar, c0);
                let n = t.b.use_var(count);
                let n = t.b.ins().iadd_imm_s(n, 1);
                t.b.def_var(count, n);
            })
        });
        let n = self.b.use_var(count);
        let pos = self.b.use_var(self.out_pos);
        let addr = self.element_addr(self.out_base, pos, Ty::F);
        let bytes = (n_lanes * self.precision.bytes()) as i32;
        for (u, var) in partials.iter().enumerate() {
            let sum = self.b.use_var(*var);
            let offset = u as i32 * bytes;
            let v = match self.counts {
                Some(_) => {
                    let cur = self.b.ins().load(self.lanes.float, VEC_FLAGS, addr, offset);
                    self.b.ins().fadd(cur, sum)
                }
                None => {
                    let value = if r.op == RedOp::Mean {
                        let fty = self.fty();
                        let nf = self.b.ins().fcvt_from_sint(fty, n);
                        let nv = self.b.ins().splat(self.lanes.float, nf);
                        self.b.ins().fdiv(sum, nv)
                    } else {
                        sum
                    };
                    let empty = self.splat_float(r.empty);
                    let none = self.b.ins().icmp_imm_s(IntCC::Equal, n, 0);
                    self.b.ins().select(none, empty, value)
                }
            };
            self.b.ins().store(VEC_FLAGS, v, addr, offset);
        }
        if let Some(counts) = self.counts {
            let caddr = self.element_addr(counts, pos, Ty::I);
            for l in 0..(width as i32 * i32::from(self.lanes.n)) {
                let c = self.b.ins().load(types::I64, VEC_FLAGS, caddr, 8 * l);
                let c = self.b.ins().iadd(c, n);
                self.b.ins().store(VEC_FLAGS, c, caddr, 8 * l);
            }
        }
        let next = self.b.ins().iadd_imm_s(pos, width as i64 * n_lanes);
        self.b.def_var(self.out_pos, next);
    }

    /// The column loop: `width` vectors of columns per step while they fit,
    /// the counter left at the first column not done.
    pub(super) fn translate_column_steps(&mut self, level: usize, width: usize) {
        self.translate_strided_loop(level, 1, width as i64, &mut |t, _| {
            t.translate_vector_column_point(width)
        });
    }

    /// The reduced loops of a column sum, plain.
    fn translate_column_loops(&mut self, level: usize, item: &mut dyn FnMut(&mut Self)) {
        if level == self.levels.len() {
            item(self);
        } else {
            self.translate_loop(level, &mut |t| t.translate_column_loops(level + 1, item));
        }
    }

    /// The vector part of a summed innermost loop: `LANES` partial sums,
    /// folded into the scalar accumulator `acc` and `count` after the loop.
    pub(super) fn translate_vector_sum(
        &mut self,
        level: usize,
        acc: cranelift_frontend::Variable,
        count: cranelift_frontend::Variable,
    ) {
        let body = self.body.expect("a vectorised sum has a body");
        let start = self.bounds[level].0;
        let passed = self.start_mask_count();
        self.translate_vector_fold(level, acc, &mut |t| {
            let mask = t.translate_vfilter();
            let x = t.translate_vexpr(body);
            if let Some((base, cbody)) = t.column {
                // The column partner's lanes added into its row of sums.
                let y = t.translate_vexpr(cbody);
                let y = t.masked(mask, y, 0.0, None);
                let j = t.b.use_var(t.loop_vars[level]);
                let addr = t.element_addr(base, j, Ty::F);
                let cur = t.b.ins().load(t.lanes.float, VEC_FLAGS, addr, 0);
                let sum = t.b.ins().fadd(cur, y);
                t.b.ins().store(VEC_FLAGS, sum, addr, 0);
            }
            t.masked(mask, x, 0.0, passed)
        });
        self.finish_count(level, start, count, passed);
    }

    /// Pass one of a vectorised logsumexp: a running maximum per lane
    /// (`x > max` replaces it, so NaN is ignored), folded into the scalar
    /// maximum `acc` by the same rule, and the elements counted.
    pub(super) fn translate_vector_max(
        &mut self,
        level: usize,
        acc: cranelift_frontend::Variable,
        count: cranelift_frontend::Variable,
    ) {
        let lanes = self.lanes;
        let start = self.bounds[level].0;
        let passed = self.start_mask_count();
        let v = self.translate_vector_best(level, f64::NEG_INFINITY, passed, &|t, x, cur| {
            let gt = t.b.ins().fcmp(FloatCC::GreaterThan, x, cur);
            let gt = t.mask_as_float(gt);
            t.b.ins().bitselect(gt, x, cur)
        });
        let mut cur = self.b.use_var(acc);
        for l in 0..lanes.n {
            let x = self.b.ins().extractlane(v, l);
            let gt = self.b.ins().fcmp(FloatCC::GreaterThan, x, cur);
            cur = self.b.ins().select(gt, x, cur);
        }
        self.b.def_var(acc, cur);
        self.finish_count(level, start, count, passed);
    }

    /// A vectorised `max`/`min`: the scalar rule (`translate_item`) per
    /// lane from an infinite start, the lanes then folded into `acc` by the
    /// same rule (the first fold takes its lane when nothing came before).
    pub(super) fn translate_vector_extreme(
        &mut self,
        level: usize,
        max: bool,
        acc: cranelift_frontend::Variable,
        count: cranelift_frontend::Variable,
    ) {
        let lanes = self.lanes;
        let worst = if max {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        };
        let cc = if max {
            FloatCC::GreaterThan
        } else {
            FloatCC::LessThan
        };
        let start = self.bounds[level].0;
        let passed = self.start_mask_count();
        let v = self.translate_vector_best(level, worst, passed, &|t, x, cur| {
            let better = t.b.ins().fcmp(cc, x, cur);
            let x_nan = t.b.ins().fcmp(FloatCC::Unordered, x, x);
            let cur_num = t.b.ins().fcmp(FloatCC::Ordered, cur, cur);
            let nan_wins = t.b.ins().band(x_nan, cur_num);
            let take = t.b.ins().bor(better, nan_wins);
            let take = t.mask_as_float(take);
            t.b.ins().bitselect(take, x, cur)
        });
        let n0 = self.b.use_var(count);
        let mut cur = self.b.use_var(acc);
        for l in 0..lanes.n {
            let x = self.b.ins().extractlane(v, l);
            let better = self.b.ins().fcmp(cc, x, cur);
            let x_nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
            let cur_num = self.b.ins().fcmp(FloatCC::Ordered, cur, cur);
            let nan_wins = self.b.ins().band(x_nan, cur_num);
            let mut take = self.b.ins().bor(better, nan_wins);
            if l == 0 {
                let first = self.b.ins().icmp_imm_s(IntCC::Equal, n0, 0);
                take = self.b.ins().bor(take, first);
            }
            cur = self.b.ins().select(take, x, cur);
        }
        self.b.def_var(acc, cur);
        self.finish_count(level, start, count, passed);
    }

    /// The running best of the innermost loop per lane by `pick(x, best)`,
    /// from `worst` (also what masked-out lanes give).
    fn translate_vector_best(
        &mut self,
        level: usize,
        worst: f64,
        passed: Option<cranelift_frontend::Variable>,
        pick: &dyn Fn(&mut Self, Value, Value) -> Value,
    ) -> Value {
        let body = self.body.expect("a vectorised reduction has a body");
        self.translate_vector_accumulate(
            level,
            worst,
            &mut |t| {
                let mask = t.translate_vfilter();
                let x = t.translate_vexpr(body);
                t.masked(mask, x, worst, passed)
            },
            pick,
        )
    }

    /// Pass two of a vectorised logsumexp: `sum += exp(x - m)` in lanes.
    pub(super) fn translate_vector_exp_sum(
        &mut self,
        level: usize,
        sum: cranelift_frontend::Variable,
        m: Value,
    ) {
        let body = self.body.expect("a vectorised logsumexp has a body");
        self.translate_vector_fold(level, sum, &mut |t| {
            let mask = t.translate_vfilter();
            let x = t.translate_vexpr(body);
            let mv = t.b.ins().splat(t.lanes.float, m);
            let d = t.b.ins().fsub(x, mv);
            let e = t.translate_vexp(d);
            t.masked(mask, e, 0.0, None)
        });
    }

    /// `LANES` partial sums of `step`'s vectors over the vector loop, folded
    /// lane by lane into the scalar `acc`.
    fn translate_vector_fold(
        &mut self,
        level: usize,
        acc: cranelift_frontend::Variable,
        step: &mut dyn FnMut(&mut Self) -> Value,
    ) {
        let p =
            self.translate_vector_accumulate(level, 0.0, step, &|t, x, cur| t.b.ins().fadd(cur, x));
        let mut folded = self.b.ins().extractlane(p, 0);
        for l in 1..self.lanes.n {
            let x = self.b.ins().extractlane(p, l);
            folded = self.b.ins().fadd(folded, x);
        }
        let cur = self.b.use_var(acc);
        let sum = self.b.ins().fadd(cur, folded);
        self.b.def_var(acc, sum);
    }

    /// The innermost loop from its start, `acc = pick(step(), acc)` per
    /// lane: `FOLD_UNROLL` independent accumulators from `init` (which hides
    /// the latency of each pick) while they fit, then one vector at a time
    /// into the first; the accumulators combined in order (later ones as
    /// `x`).
    fn translate_vector_accumulate(
        &mut self,
        level: usize,
        init: f64,
        step: &mut dyn FnMut(&mut Self) -> Value,
        pick: &dyn Fn(&mut Self, Value, Value) -> Value,
    ) -> Value {
        let init = self.splat_float(init);
        let accs: Vec<cranelift_frontend::Variable> = (0..FOLD_UNROLL)
            .map(|_| {
                let v = self.b.declare_var(self.lanes.float);
                self.b.def_var(v, init);
                v
            })
            .collect();
        let start = self.bounds[level].0;
        self.b.def_var(self.loop_vars[level], start);
        for unroll in [FOLD_UNROLL, 1] {
            self.translate_unrolled_loop(level, unroll, &mut |t, u| {
                let x = step(t);
                let var = accs[u as usize];
                let cur = t.b.use_var(var);
                let next = pick(t, x, cur);
                t.b.def_var(var, next);
            });
        }
        let mut v = self.b.use_var(accs[0]);
        for var in &accs[1..] {
            let x = self.b.use_var(*var);
            v = pick(self, x, v);
        }
        v
    }

    /// The filter's mask for a step of `VectorLoop::First`.
    pub(super) fn translate_vfirst_mask(&mut self) -> Value {
        self.translate_vfilter()
            .expect("`analyse` plans First only with a lane-wise filter")
    }

    /// The filter's mask for this vector step (`None`: every lane passes).
    fn translate_vfilter(&mut self) -> Option<Value> {
        let f = masked_filter(self.dag, self.filter, self.n_out())?;
        let v = self.translate_vexpr(f);
        Some(match self.dag.terms[f].ty {
            Ty::F => {
                let zero = self.splat_float(0.0);
                self.b.ins().fcmp(FloatCC::NotEqual, v, zero)
            }
            _ => v,
        })
    }

    /// With a lane-wise filter, a per-lane count of passing elements.
    fn start_mask_count(&mut self) -> Option<cranelift_frontend::Variable> {
        masked_filter(self.dag, self.filter, self.n_out())?;
        let var = self.b.declare_var(self.lanes.mask);
        let zero = self.b.ins().iconst(self.lanes.lane_int, 0);
        let zeros = self.b.ins().splat(self.lanes.mask, zero);
        self.b.def_var(var, zeros);
        Some(var)
    }

    /// `x` where the mask passes, `fill` elsewhere; passing lanes counted
    /// (a passing lane is -1).
    fn masked(
        &mut self,
        mask: Option<Value>,
        x: Value,
        fill: f64,
        passed: Option<cranelift_frontend::Variable>,
    ) -> Value {
        let Some(mask) = mask else { return x };
        if let Some(p) = passed {
            let cur = self.b.use_var(p);
            let next = self.b.ins().isub(cur, mask);
            self.b.def_var(p, next);
        }
        let fill = self.splat_float(fill);
        let m = self.mask_as_float(mask);
        self.b.ins().bitselect(m, x, fill)
    }

    /// `count +=` the elements the vector loop folded: every one
    /// (`i - start`), or those that passed the filter.
    fn finish_count(
        &mut self,
        level: usize,
        start: Value,
        count: cranelift_frontend::Variable,
        passed: Option<cranelift_frontend::Variable>,
    ) {
        let n = match passed {
            None => {
                let done = self.b.use_var(self.loop_vars[level]);
                self.b.ins().isub(done, start)
            }
            Some(p) => {
                let v = self.b.use_var(p);
                let mut total = self.b.ins().iconst(types::I64, 0);
                for l in 0..self.lanes.n {
                    let x = self.b.ins().extractlane(v, l);
                    let x = if self.lanes.lane_int == types::I64 {
                        x
                    } else {
                        self.b.ins().uextend(types::I64, x)
                    };
                    total = self.b.ins().iadd(total, x);
                }
                total
            }
        };
        let c = self.b.use_var(count);
        let c = self.b.ins().iadd(c, n);
        self.b.def_var(count, c);
    }

    fn splat_float(&mut self, x: f64) -> Value {
        let s = self.fconst(x);
        self.b.ins().splat(self.lanes.float, s)
    }

    /// A mask reinterpreted as floats, for `bitselect` on float lanes.
    fn mask_as_float(&mut self, m: Value) -> Value {
        self.b
            .ins()
            .bitcast(self.lanes.float, MemFlagsData::new(), m)
    }

    /// A scalar bool (0 or 1) as a mask of all-ones or all-zeros lanes.
    fn splat_bool(&mut self, b: Value) -> Value {
        let wide = self.b.ins().uextend(self.lanes.lane_int, b);
        let ones = self.b.ins().ineg(wide);
        self.b.ins().splat(self.lanes.mask, ones)
    }

    /// The vector value of term `id` (its type's lanes: floats, or masks for
    /// bools); a term that does not vary along the loop is computed as a
    /// scalar and broadcast.
    fn translate_vexpr(&mut self, id: usize) -> Value {
        if let Some(v) = self.vmemo.iter().rev().find_map(|m| m.get(&id).copied()) {
            return v;
        }
        let dag = self.dag;
        let term = &dag.terms[id];
        let v = if !self.varies[id] {
            let s = self.translate_expr(id);
            match term.ty {
                Ty::F => self.b.ins().splat(self.lanes.float, s),
                Ty::B => self.splat_bool(s),
                Ty::I => unreachable!("an int term never reaches vector code"),
            }
        } else {
            match &term.op {
                Op::Read(node, at) => self.translate_vread(*node, at, &term.checked),
                Op::Unary(op, a) => self.translate_vunary(*op, *a),
                Op::Binary(op, a, b) => self.translate_vbinary(*op, *a, *b),
                Op::Select(c, a, b) => self.translate_vselect(*c, *a, *b, term.ty),
                _ => unreachable!("`analyse` admits no other term per lane"),
            }
        };
        if let Some(scope) = self.vmemo.last_mut() {
            scope.insert(id, v);
        }
        v
    }

    /// `LANES` consecutive elements of a row: the leading indices evaluated
    /// (and checked) as the scalar read does, the last one the loop counter.
    fn translate_vread(
        &mut self,
        node: crate::ir::NodeId,
        at: &[usize],
        checked: &[bool],
    ) -> Value {
        let last = at.len() - 1;
        if checked.get(last).copied().unwrap_or(true) {
            // Every lane in range, or the scalar code takes over.
            let i = self.lane_index(at[last]);
            let top = self.b.ins().iadd_imm_s(i, i64::from(self.lanes.n) - 1);
            let dim = self.read_dims[&node][last];
            let out = self
                .b
                .ins()
                .icmp(IntCC::UnsignedGreaterThanOrEqual, top, dim);
            self.bail_if(out);
        }
        let addr = self.read_row_address(node, at, checked, Ty::F);
        self.b.ins().load(self.lanes.float, VEC_FLAGS, addr, 0)
    }

    /// The address of a read's element at the vector loop's counter: the
    /// leading indices evaluated (and checked) as the scalar read does, the
    /// last one the counter.
    fn read_row_address(
        &mut self,
        node: crate::ir::NodeId,
        at: &[usize],
        checked: &[bool],
        ty: Ty,
    ) -> Value {
        let dims = self.read_dims[&node].clone();
        let last = at.len() - 1;
        let mut offset: Option<Value> = None;
        for (k, &ix) in at[..last].iter().enumerate() {
            let v = self.translate_expr(ix);
            let v = self.convert(v, self.dag.terms[ix].ty, Ty::I);
            if checked.get(k).copied().unwrap_or(true) {
                let out = self
                    .b
                    .ins()
                    .icmp(IntCC::UnsignedGreaterThanOrEqual, v, dims[k]);
                if self.bail.is_some() {
                    self.bail_if(out);
                } else {
                    let site = super::ErrorSite::Index { node, dim: k };
                    self.translate_error_if(out, site, v, dims[k]);
                }
            }
            offset = Some(match offset {
                None => v,
                Some(o) => {
                    let scaled = self.b.ins().imul(o, dims[k]);
                    self.b.ins().iadd(scaled, v)
                }
            });
        }
        let i = self.lane_index(at[last]);
        let offset = match offset {
            None => i,
            Some(o) => {
                let scaled = self.b.ins().imul(o, dims[last]);
                self.b.ins().iadd(scaled, i)
            }
        };
        let base = self.bases[&node];
        self.element_addr(base, offset, ty)
    }

    /// The first lane's value of a read's last index: the vector loop's
    /// counter plus the index's constant (`lane_offset`).
    fn lane_index(&mut self, t: usize) -> Value {
        let i = self.b.use_var(self.loop_vars[self.vlevel]);
        match lane_offset(self.dag, self.levels[self.vlevel].0, t) {
            Some(0) | None => i,
            Some(c) => self.b.ins().iadd_imm_s(i, c),
        }
    }

    /// A math helper applied to each lane (the scalar code's own function).
    fn per_lane(&mut self, m: Math, args: &[Value]) -> Value {
        let mut out: Option<Value> = None;
        for l in 0..self.lanes.n {
            let xs: Vec<Value> = args
                .iter()
                .map(|a| self.b.ins().extractlane(*a, l))
                .collect();
            let r = self.call(m, &xs);
            out = Some(match out {
                None => self.b.ins().splat(self.lanes.float, r),
                Some(v) => self.b.ins().insertlane(v, r, l),
            });
        }
        out.expect("at least one lane")
    }

    /// `crate::math`'s exp, step for step, on every lane: the same bits as
    /// the scalar helper and the interpreter.
    pub(super) fn translate_vexp(&mut self, x: Value) -> Value {
        struct C {
            log2e: f64,
            ln2_hi: f64,
            ln2_lo: f64,
            magic: f64,
            lo: f64,
            hi: f64,
            coef: Vec<f64>,
            shift_bias: i64,
            exp_bias: i64,
            mantissa_bits: i64,
        }
        let c = match self.precision {
            Precision::F64 => {
                let e = &crate::math::EXP_F64;
                C {
                    log2e: e.log2e,
                    ln2_hi: e.ln2_hi,
                    ln2_lo: e.ln2_lo,
                    magic: e.magic,
                    lo: e.lo,
                    hi: e.hi,
                    coef: e.coef.to_vec(),
                    shift_bias: e.shift_bias,
                    exp_bias: e.exp_bias,
                    mantissa_bits: e.mantissa_bits,
                }
            }
            Precision::F32 => {
                let e = &crate::math::EXP_F32;
                C {
                    log2e: f64::from(e.log2e),
                    ln2_hi: f64::from(e.ln2_hi),
                    ln2_lo: f64::from(e.ln2_lo),
                    magic: f64::from(e.magic),
                    lo: f64::from(e.lo),
                    hi: f64::from(e.hi),
                    coef: e.coef.iter().map(|k| f64::from(*k)).collect(),
                    shift_bias: e.shift_bias,
                    exp_bias: e.exp_bias,
                    mantissa_bits: e.mantissa_bits,
                }
            }
        };
        let mask = self.lanes.mask;
        let lo = self.splat_float(c.lo);
        let hi = self.splat_float(c.hi);
        let below = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        let below = self.mask_as_float(below);
        let clamped = self.b.ins().bitselect(below, lo, x);
        let above = self.b.ins().fcmp(FloatCC::GreaterThan, clamped, hi);
        let above = self.mask_as_float(above);
        let clamped = self.b.ins().bitselect(above, hi, clamped);
        let log2e = self.splat_float(c.log2e);
        let magic = self.splat_float(c.magic);
        let t = self.b.ins().fmul(clamped, log2e);
        let t = self.b.ins().fadd(t, magic);
        let n = self.b.ins().fsub(t, magic);
        let ln2_hi = self.splat_float(c.ln2_hi);
        let ln2_lo = self.splat_float(c.ln2_lo);
        let nh = self.b.ins().fmul(n, ln2_hi);
        let r = self.b.ins().fsub(clamped, nh);
        let nl = self.b.ins().fmul(n, ln2_lo);
        let r = self.b.ins().fsub(r, nl);
        let mut p = self.splat_float(c.coef[0]);
        for k in &c.coef[1..] {
            let kv = self.splat_float(*k);
            let pr = self.b.ins().fmul(p, r);
            p = self.b.ins().fadd(pr, kv);
        }
        // n as an integer from the bits of t, and 2^h, 2^(n-h).
        let splat_int = |t: &mut Self, v: i64| -> Value {
            let s = t.b.ins().iconst(t.lanes.lane_int, v);
            t.b.ins().splat(mask, s)
        };
        let flags = MemFlagsData::new();
        let t_bits = self.b.ins().bitcast(mask, flags, t);
        let magic_bits = self.b.ins().bitcast(mask, flags, magic);
        let ni = self.b.ins().isub(t_bits, magic_bits);
        let bias = splat_int(self, c.shift_bias);
        let half_bias = splat_int(self, c.shift_bias >> 1);
        let h = self.b.ins().iadd(ni, bias);
        let h = self.b.ins().ushr_imm_u(h, 1);
        let h = self.b.ins().isub(h, half_bias);
        let e = splat_int(self, c.exp_bias);
        let s1 = self.b.ins().iadd(h, e);
        let s1 = self.b.ins().ishl_imm_u(s1, c.mantissa_bits);
        let s1 = self.b.ins().bitcast(self.lanes.float, flags, s1);
        let s2 = self.b.ins().isub(ni, h);
        let s2 = self.b.ins().iadd(s2, e);
        let s2 = self.b.ins().ishl_imm_u(s2, c.mantissa_bits);
        let s2 = self.b.ins().bitcast(self.lanes.float, flags, s2);
        let y = self.b.ins().fmul(p, s1);
        let y = self.b.ins().fmul(y, s2);
        // NaN lanes return x itself.
        let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
        let nan = self.mask_as_float(nan);
        self.b.ins().bitselect(nan, x, y)
    }

    fn translate_vunary(&mut self, op: UnOp, a: usize) -> Value {
        let ty = self.dag.terms[a].ty;
        let x = self.translate_vexpr(a);
        match (op, ty) {
            (UnOp::Not, _) => self.b.ins().bnot(x),
            (UnOp::ToFloat, Ty::B) => {
                let (one, zero) = (self.splat_float(1.0), self.splat_float(0.0));
                let m = self.mask_as_float(x);
                self.b.ins().bitselect(m, one, zero)
            }
            _ => match op {
                UnOp::Neg | UnOp::Abs | UnOp::Sqrt => self
                    .float_unary_instruction(op, x)
                    .expect("one instruction"),
                UnOp::Exp => self.translate_vexp(x),
                UnOp::Log => self.per_lane(Math::Ln, &[x]),
                UnOp::Tanh => self.per_lane(Math::Tanh, &[x]),
                UnOp::Softplus => self.per_lane(Math::Softplus, &[x]),
                UnOp::LogSigmoid => self.per_lane(Math::LogSigmoid, &[x]),
                UnOp::Sigmoid => self.per_lane(Math::Sigmoid, &[x]),
                UnOp::Relu => {
                    // x when x > 0 or x is NaN, else 0 (as the scalar code).
                    let zero = self.splat_float(0.0);
                    let keep = self.b.ins().fcmp(FloatCC::UnorderedOrGreaterThan, x, zero);
                    let keep = self.mask_as_float(keep);
                    self.b.ins().bitselect(keep, x, zero)
                }
                UnOp::Detach | UnOp::ToFloat | UnOp::Not => x,
            },
        }
    }

    fn translate_vbinary(&mut self, op: BinOp, a: usize, b: usize) -> Value {
        let ta = self.dag.terms[a].ty;
        if ta == Ty::I {
            let var = self.levels[self.vlevel].0;
            return match int_read_side(self.dag, &self.varies, var, a, b) {
                Some(read_left) => self.translate_int_read_comparison(op, a, b, read_left),
                None => self.translate_index_comparison(op, a, b),
            };
        }
        let x = self.translate_vexpr(a);
        let y = self.translate_vexpr(b);
        if ta == Ty::B {
            return match op {
                BinOp::And => self.b.ins().band(x, y),
                BinOp::Or => self.b.ins().bor(x, y),
                BinOp::Eq => self.b.ins().icmp(IntCC::Equal, x, y),
                _ => self.b.ins().icmp(IntCC::NotEqual, x, y),
            };
        }
        match op {
            BinOp::Pow => self.per_lane(Math::Pow, &[x, y]),
            BinOp::Max | BinOp::ClampMin => self.translate_vnan_extreme(x, y, true),
            BinOp::Min | BinOp::ClampMax => self.translate_vnan_extreme(x, y, false),
            _ => self
                .float_instruction(op, x, y)
                .expect("`analyse` admits no other float operation"),
        }
    }

    /// `i + l <op> c` for the lanes `l` of innermost index `i` and an
    /// invariant `c`, as `l <op> d` with `d = c - i` clamped to
    /// `-1 ..= LANES` (which keeps every lane's outcome and fits a lane).
    fn translate_index_comparison(&mut self, op: BinOp, a: usize, b: usize) -> Value {
        let var = self.levels[self.vlevel].0;
        let index_left = index_side(self.dag, &self.varies, var, a, b)
            .expect("`analyse` admits only the vector loop's index against an invariant");
        let other = if index_left { b } else { a };
        let c = self.translate_expr(other);
        let i = self.b.use_var(self.loop_vars[self.vlevel]);
        let d = self.b.ins().isub(c, i);
        let lo = self.b.ins().iconst(types::I64, -1);
        let hi = self.b.ins().iconst(types::I64, i64::from(self.lanes.n));
        let d = self.b.ins().smax(d, lo);
        let d = self.b.ins().smin(d, hi);
        let d = if self.lanes.lane_int == types::I64 {
            d
        } else {
            self.b.ins().ireduce(self.lanes.lane_int, d)
        };
        let d = self.b.ins().splat(self.lanes.mask, d);
        let lane_bytes = self.lanes.lane_int.bytes() as usize;
        let mut bytes = Vec::with_capacity(16);
        for l in 0..u64::from(self.lanes.n) {
            bytes.extend_from_slice(&l.to_le_bytes()[..lane_bytes]);
        }
        let iota = self.b.func.dfg.constants.insert(bytes.into());
        let iota = self.b.ins().vconst(self.lanes.mask, iota);
        // Lane index on the left, whichever side the loop index was on.
        let cc = match (op, index_left) {
            (BinOp::Eq, _) => IntCC::Equal,
            (BinOp::Ne, _) => IntCC::NotEqual,
            (BinOp::Lt, true) | (BinOp::Gt, false) => IntCC::SignedLessThan,
            (BinOp::Le, true) | (BinOp::Ge, false) => IntCC::SignedLessThanOrEqual,
            (BinOp::Gt, true) | (BinOp::Lt, false) => IntCC::SignedGreaterThan,
            _ => IntCC::SignedGreaterThanOrEqual,
        };
        self.b.ins().icmp(cc, iota, d)
    }

    /// `labels[j] == c` (or `!=`) per lane: the int lanes loaded as 64-bit
    /// pairs and compared with `c` broadcast; for four f32 lanes the two
    /// pairs' masks are narrowed into one of four 32-bit lanes.
    fn translate_int_read_comparison(
        &mut self,
        op: BinOp,
        a: usize,
        b: usize,
        read_left: bool,
    ) -> Value {
        let (read, other) = if read_left { (a, b) } else { (b, a) };
        let Op::Read(node, at) = self.dag.terms[read].op.clone() else {
            unreachable!("`int_read_side` found a read");
        };
        let checked = self.dag.terms[read].checked.clone();
        let c = self.translate_expr(other);
        let base = self.read_row_address(node, &at, &checked, Ty::I);
        let c = self.b.ins().splat(types::I64X2, c);
        let cc = if op == BinOp::Eq {
            IntCC::Equal
        } else {
            IntCC::NotEqual
        };
        let pairs: Vec<Value> = (0..i32::from(self.lanes.n) / 2)
            .map(|p| {
                let v = self.b.ins().load(types::I64X2, VEC_FLAGS, base, 16 * p);
                self.b.ins().icmp(cc, v, c)
            })
            .collect();
        if self.lanes.mask == types::I64X2 {
            return pairs[0];
        }
        // Each 64-bit mask lane is all ones or all zeros: its low 4 bytes
        // make the 32-bit lane.
        let bytes: Vec<u8> = [0u8, 8, 16, 24]
            .iter()
            .flat_map(|start| (0..4).map(move |k| start + k))
            .collect();
        // Bitcasts that change the lane count must name a byte order.
        let flags = MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little);
        let lo = self.b.ins().bitcast(types::I8X16, flags, pairs[0]);
        let hi = self.b.ins().bitcast(types::I8X16, flags, pairs[1]);
        let mask = self.b.func.dfg.immediates.push(bytes.into());
        let narrowed = self.b.ins().shuffle(lo, hi, mask);
        self.b.ins().bitcast(types::I32X4, flags, narrowed)
    }

    /// `translate_nan_extreme` per lane: NaN when either is NaN, else `a`
    /// on a tie.
    fn translate_vnan_extreme(&mut self, a: Value, b: Value, max: bool) -> Value {
        let cc = if max {
            FloatCC::GreaterThanOrEqual
        } else {
            FloatCC::LessThanOrEqual
        };
        let keep_a = self.b.ins().fcmp(cc, a, b);
        let keep_a = self.mask_as_float(keep_a);
        let pick = self.b.ins().bitselect(keep_a, a, b);
        let nan = self.b.ins().fcmp(FloatCC::Unordered, a, b);
        let nan = self.mask_as_float(nan);
        let qnan = self.splat_float(f64::NAN);
        self.b.ins().bitselect(nan, qnan, pick)
    }

    /// `if c then a else b`: a branch when `c` is the same for every lane
    /// (only the taken side runs, as in the scalar code); else both sides
    /// (safe, by `analyse`) blended by the mask.
    fn translate_vselect(&mut self, c: usize, a: usize, b: usize, ty: Ty) -> Value {
        let cty = self.dag.terms[c].ty;
        let vty = match ty {
            Ty::F => self.lanes.float,
            _ => self.lanes.mask,
        };
        let safe = self.dag.terms[a].safe && self.dag.terms[b].safe;
        if !self.varies[c] || !safe {
            let then_block = self.b.create_block();
            let else_block = self.b.create_block();
            let merge = self.b.create_block();
            let result = self.b.append_block_param(merge, vty);
            if !self.varies[c] {
                let cv = self.translate_expr(c);
                let cv = self.as_b(cv, cty);
                self.b.ins().brif(cv, then_block, &[], else_block, &[]);
            } else {
                // A side that can fail runs only where the interpreter runs
                // it: every lane takes one side, or the scalar code goes on.
                let (all, any) = match self.index_comparison_ends(c) {
                    Some(ends) => ends,
                    None => {
                        let mask = self.translate_vmask(c);
                        let all = self.b.ins().vall_true(mask);
                        let any = self.b.ins().vany_true(mask);
                        (all, any)
                    }
                };
                let mixed = self.b.create_block();
                self.b.ins().brif(all, then_block, &[], mixed, &[]);
                self.b.seal_block(mixed);
                self.b.switch_to_block(mixed);
                self.bail_if(any);
                self.b.ins().jump(else_block, &[]);
            }
            self.b.seal_block(then_block);
            self.b.seal_block(else_block);
            for (block, branch) in [(then_block, a), (else_block, b)] {
                self.b.switch_to_block(block);
                self.memo.push(HashMap::new());
                self.vmemo.push(HashMap::new());
                let v = self.translate_vexpr(branch);
                self.vmemo.pop();
                self.memo.pop();
                self.b.ins().jump(merge, &[BlockArg::Value(v)]);
            }
            self.b.seal_block(merge);
            self.b.switch_to_block(merge);
            return result;
        }
        let mask = self.translate_vmask(c);
        let x = self.translate_vexpr(a);
        let y = self.translate_vexpr(b);
        let mask = match ty {
            Ty::F => self.mask_as_float(mask),
            _ => mask,
        };
        self.b.ins().bitselect(mask, x, y)
    }

    /// Whether every lane and whether any lane of condition `c` holds, when
    /// `c` is an ordering `i + l <op> c` of the vector loop's index against
    /// an invariant (Matryoshka's `if t < 96`): monotone in the lane `l`, so
    /// lanes `0` and `LANES - 1` decide, in two scalar compares instead of a
    /// mask.
    fn index_comparison_ends(&mut self, c: usize) -> Option<(Value, Value)> {
        let Op::Binary(op, a, b) = self.dag.terms[c].op else {
            return None;
        };
        if !matches!(op, BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge)
            || self.dag.terms[a].ty != Ty::I
        {
            return None;
        }
        let var = self.levels[self.vlevel].0;
        let index_left = index_side(self.dag, &self.varies, var, a, b)?;
        let other = if index_left { b } else { a };
        let bound = self.translate_expr(other);
        let i = self.b.use_var(self.loop_vars[self.vlevel]);
        // Lane `l` holds when `l <cc> bound - i`.
        let d = self.b.ins().isub(bound, i);
        let cc = match (op, index_left) {
            (BinOp::Lt, true) | (BinOp::Gt, false) => IntCC::SignedLessThan,
            (BinOp::Le, true) | (BinOp::Ge, false) => IntCC::SignedLessThanOrEqual,
            (BinOp::Gt, true) | (BinOp::Lt, false) => IntCC::SignedGreaterThan,
            _ => IntCC::SignedGreaterThanOrEqual,
        };
        let first = self.b.ins().iconst(types::I64, 0);
        let last = self.b.ins().iconst(types::I64, i64::from(self.lanes.n) - 1);
        let first = self.b.ins().icmp(cc, first, d);
        let last = self.b.ins().icmp(cc, last, d);
        Some((
            self.b.ins().band(first, last),
            self.b.ins().bor(first, last),
        ))
    }

    /// A condition's lanes as a mask (a float condition is true where
    /// nonzero).
    fn translate_vmask(&mut self, c: usize) -> Value {
        let cv = self.translate_vexpr(c);
        match self.dag.terms[c].ty {
            Ty::F => {
                let zero = self.splat_float(0.0);
                self.b.ins().fcmp(FloatCC::NotEqual, cv, zero)
            }
            _ => cv,
        }
    }
}
