//! The `Translator`: one comprehension node to one Cranelift function, one
//! `translate_*` method per construct (see the module doc of `jit` for the
//! steps and invariants).
//!
//! Kernel signature: `fn(bufs: *const *mut u8, dims: *const i64,
//! err: *mut i64, ctl: *const i64) -> i64`. `bufs[k]` is the row-major
//! buffer (float of the compiled precision, i64, or u8 for bool) of the
//! kernel's `k`-th node, `dims[k]` the runtime value of its `k`-th dim-table
//! slot, both numbered in the order the kernel first uses them (`Slots`).
//! The kernel returns 0, or `site + 1` after storing the offending index and
//! the dim size in `err[0]`, `err[1]`, `site` numbering the kernel's own
//! error sites. So nothing in the code names a node, a dim or a site, and
//! kernels that compute the same thing on different nodes compile to one
//! function (`Emitter::define` in `mod.rs`).
//!
//! `ctl` ranges the loops (`Ctl` in `mod.rs`): the outermost output loop runs
//! over `ctl[0] .. ctl[1]` (clamped to `0 .. extent`), so threads split a node
//! by rows and a streaming pass computes one block of rows; a kernel compiled
//! as *accumulating* (`Kernel::ranged_red`) runs that reduced level over
//! `ctl[2] .. ctl[3]` only and adds its raw fold (the sum, or the count) into
//! its output, and the number of elements that passed into the i64 buffer at
//! `ctl[4]`; the caller zeroes both first and turns them into the reduction's
//! value afterwards (`finalize` in `mod.rs`). A reduction to a scalar that
//! threads split (`Kernel::split_red`) runs its outermost reduced level over
//! `ctl[2] .. ctl[3]` and writes that block's value; a split logsumexp reads
//! a mode at `ctl[5]`: 0 its value, 1 the block's maximum, 2 the block's sum
//! of `exp(x - m)` for the f64 `m` at `ctl[6]` (`run.rs` combines them as
//! the interpreter's two passes).

mod simd;

pub(super) use simd::VectorLoop;

use super::helpers::{Imported, Math};
use super::plan::{Dag, DimTable, Op, Ty};
use super::{ErrorSite, Precision};
use crate::ir::{BinOp, Comp, DType, Dim, Graph, IdxVar, NodeId, RedOp, Reduce, UnOp};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    types, BlockArg, InstBuilder, MemFlagsData, StackSlot, StackSlotData, StackSlotKind, Type,
    Value,
};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::{FunctionBuilder, Variable};
use std::collections::HashMap;

/// What one kernel computes: the comprehension and its plan.
pub(super) struct Kernel<'a> {
    pub graph: &'a Graph,
    pub node: NodeId,
    pub comp: &'a Comp,
    pub dtype: DType,
    pub precision: Precision,
    pub dag: &'a Dag,
    /// `(variable, extent)` per loop level: output indices, then reduced ones.
    pub levels: &'a [(IdxVar, Dim)],
    /// The term of the body (none for `count`, which never evaluates it).
    pub body: Option<usize>,
    pub filter: Option<usize>,
    /// The reduced level a streaming pass splits into blocks: the kernel
    /// accumulates (module doc). Only for `sum`, `mean` and `count`.
    pub ranged_red: Option<usize>,
    /// A reduction to a scalar that threads split: its outermost reduced
    /// level runs over `ctl[2] .. ctl[3]`, and a logsumexp's `ctl[5]` picks
    /// what it computes (module doc).
    pub split_red: bool,
    /// More outputs of an elementwise kernel (a fusion group): each node
    /// and the term of its body, stored at the same position as `node`'s.
    pub also: Vec<(NodeId, usize)>,
    /// A row sum's column partner (`mod.rs`, `Group`): a node summing the
    /// same domain by columns, and the term of its body; each element adds
    /// it into that node's buffer (a thread's own) at the innermost index.
    pub column: Option<(NodeId, usize)>,
}

/// The nodes and dim-table slots a kernel's `bufs` and `dims` tables hold,
/// in the kernel's own order: the run gathers each call's tables from its
/// pointers and dim values through these.
#[derive(Clone, Debug, Default)]
pub(super) struct Slots {
    pub bufs: Vec<NodeId>,
    pub dims: Vec<usize>,
}

impl Slots {
    /// The table entry of node `n`'s base, a new one at its first use.
    fn buf(&mut self, n: NodeId) -> i32 {
        let k = match self.bufs.iter().position(|m| *m == n) {
            Some(k) => k,
            None => {
                self.bufs.push(n);
                self.bufs.len() - 1
            }
        };
        (k * 8) as i32
    }
}

/// One comprehension being translated into one function.
pub(super) struct Translator<'a, 'f> {
    b: FunctionBuilder<'f>,
    graph: &'a Graph,
    comp: &'a Comp,
    dtype: DType,
    precision: Precision,
    dag: &'a Dag,
    levels: &'a [(IdxVar, Dim)],
    body: Option<usize>,
    filter: Option<usize>,
    helpers: Imported,
    sites: &'a mut Vec<ErrorSite>,
    /// Values of terms, innermost scope last. A scope is opened for each loop
    /// body and each branch, so a remembered value always dominates its uses.
    memo: Vec<HashMap<usize, Value>>,
    /// How the kernel runs vectorised (`simd.rs`), if it does: along loop
    /// level `vlevel`, the terms that `varies` per lane.
    vector: Option<VectorLoop>,
    vlevel: usize,
    varies: Vec<bool>,
    lanes: simd::Lanes,
    /// Vector values of terms, scoped as `memo`.
    vmemo: Vec<HashMap<usize, Value>>,
    /// Inside a vector loop that may hand a row to the scalar loop: the
    /// block that does (`simd::bail_if`).
    bail: Option<cranelift_codegen::ir::Block>,
    loop_vars: Vec<Variable>,
    /// `(start, end)` of each loop level, clamped to `0 .. extent`.
    bounds: Vec<(Value, Value)>,
    /// The count buffer of an accumulating kernel.
    counts: Option<Value>,
    /// Dim-table slot values, loaded once in the entry block.
    dim_vals: HashMap<usize, Value>,
    bases: HashMap<NodeId, Value>,
    read_dims: HashMap<NodeId, Vec<Value>>,
    err: Value,
    out_base: Value,
    out_pos: Variable,
    /// A split logsumexp's mode (`ctl[5]`) and given maximum (`ctl[6]`).
    split_lse: Option<(Value, Value)>,
    /// The base and body term of each further output (`Kernel::also`).
    also: Vec<(Value, usize)>,
    /// The base and body term of the column partner (`Kernel::column`).
    column: Option<(Value, usize)>,
    /// A scratch slot that hoisted values are stored to (`hoist`).
    anchor: Option<StackSlot>,
    slots: Slots,
}

/// Accumulators of one reduction.
#[derive(Clone, Copy)]
struct Acc {
    op: RedOp,
    count: Variable,
    /// The running value (sum, best, flag, or running max for logsumexp).
    acc: Option<(Variable, Ty)>,
}

const TRUSTED: MemFlagsData = MemFlagsData::trusted();

impl<'a, 'f> Translator<'a, 'f> {
    /// Starts the function: the entry block with its parameters, every dim
    /// the kernel needs, every base pointer it reads or writes, and the loop
    /// counters.
    pub fn new(
        k: Kernel<'a>,
        mut b: FunctionBuilder<'f>,
        dims: &'a mut DimTable,
        helpers: Imported,
        sites: &'a mut Vec<ErrorSite>,
    ) -> Self {
        let plan = simd::analyse(&k);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        b.seal_block(entry);
        let params = b.block_params(entry).to_vec();
        let (bufs, dims_ptr, err, ctl) = (params[0], params[1], params[2], params[3]);
        let mut slots = Slots::default();
        let mut dim_vals: HashMap<usize, Value> = HashMap::new();
        fn load_slot(
            b: &mut FunctionBuilder,
            dim_vals: &mut HashMap<usize, Value>,
            slots: &mut Slots,
            dims_ptr: Value,
            slot: usize,
        ) -> Value {
            *dim_vals.entry(slot).or_insert_with(|| {
                slots.dims.push(slot);
                let at = ((slots.dims.len() - 1) * 8) as i32;
                b.ins().load(types::I64, TRUSTED, dims_ptr, at)
            })
        }
        let extents: Vec<Value> = k
            .levels
            .iter()
            .map(|(_, d)| load_slot(&mut b, &mut dim_vals, &mut slots, dims_ptr, dims.slot(d)))
            .collect();
        let mut bases = HashMap::new();
        let mut read_dims = HashMap::new();
        for term in &k.dag.terms {
            match &term.op {
                Op::Read(n, _) if !bases.contains_key(n) => {
                    let at = slots.buf(*n);
                    let base = b.ins().load(types::I64, TRUSTED, bufs, at);
                    bases.insert(*n, base);
                    let ds: Vec<Value> = k
                        .graph
                        .node(*n)
                        .shape
                        .iter()
                        .map(|d| {
                            load_slot(&mut b, &mut dim_vals, &mut slots, dims_ptr, dims.slot(d))
                        })
                        .collect();
                    read_dims.insert(*n, ds);
                }
                Op::Size(slot) => {
                    load_slot(&mut b, &mut dim_vals, &mut slots, dims_ptr, *slot);
                }
                _ => {}
            }
        }
        let mut load_base = |b: &mut FunctionBuilder, n: NodeId| {
            let at = slots.buf(n);
            b.ins().load(types::I64, TRUSTED, bufs, at)
        };
        let out_base = load_base(&mut b, k.node);
        let also: Vec<(Value, usize)> = k
            .also
            .iter()
            .map(|(n, body)| (load_base(&mut b, *n), *body))
            .collect();
        let column = k.column.map(|(n, body)| (load_base(&mut b, n), body));
        let loop_vars: Vec<Variable> = k.levels.iter().map(|_| b.declare_var(types::I64)).collect();
        let n_out = k.comp.indices.len();
        let zero = b.ins().iconst(types::I64, 0);
        let ranged = |b: &mut FunctionBuilder, slot: i32, extent: Value| {
            let lo = b.ins().load(types::I64, TRUSTED, ctl, slot * 8);
            let hi = b.ins().load(types::I64, TRUSTED, ctl, slot * 8 + 8);
            let lo = b.ins().smax(lo, zero);
            let hi = b.ins().smin(hi, extent);
            (lo, hi)
        };
        let bounds: Vec<(Value, Value)> = extents
            .iter()
            .enumerate()
            .map(|(l, &e)| {
                if l == 0 && n_out > 0 {
                    ranged(&mut b, 0, e)
                } else if Some(l) == k.ranged_red || (k.split_red && l == 0 && n_out == 0) {
                    ranged(&mut b, 2, e)
                } else {
                    (zero, e)
                }
            })
            .collect();
        let counts = k
            .ranged_red
            .map(|_| b.ins().load(types::I64, TRUSTED, ctl, 32));
        let split_lse = (k.split_red
            && k.comp
                .reduce
                .as_ref()
                .is_some_and(|r| r.op == RedOp::LogSumExp))
        .then(|| {
            let mode = b.ins().load(types::I64, TRUSTED, ctl, 40);
            let m = b.ins().load(types::F64, TRUSTED, ctl, 48);
            let m = match k.precision {
                Precision::F64 => m,
                Precision::F32 => b.ins().fdemote(types::F32, m),
            };
            (mode, m)
        });
        // The first output position: the first row times the row length.
        let out_pos = b.declare_var(types::I64);
        let start = match n_out {
            0 => zero,
            _ => {
                let row = extents[1..n_out]
                    .iter()
                    .fold(b.ins().iconst(types::I64, 1), |acc, &e| {
                        b.ins().imul(acc, e)
                    });
                b.ins().imul(bounds[0].0, row)
            }
        };
        b.def_var(out_pos, start);
        Translator {
            b,
            graph: k.graph,
            comp: k.comp,
            dtype: k.dtype,
            precision: k.precision,
            dag: k.dag,
            levels: k.levels,
            body: k.body,
            filter: k.filter,
            helpers,
            sites,
            memo: vec![HashMap::new()],
            vector: plan.as_ref().map(|p| p.how),
            vlevel: plan.as_ref().map_or(0, |p| p.level),
            varies: plan.map(|p| p.varies).unwrap_or_default(),
            lanes: simd::Lanes::of(k.precision),
            vmemo: Vec::new(),
            bail: None,
            loop_vars,
            bounds,
            counts,
            dim_vals,
            bases,
            read_dims,
            err,
            out_base,
            out_pos,
            split_lse,
            also,
            column,
            anchor: None,
            slots,
        }
    }

    /// The nodes and dims the kernel's tables hold (`Slots`).
    pub fn slots(&self) -> Slots {
        self.slots.clone()
    }

    /// How the kernel's innermost loop runs vectorised, if it does.
    pub fn vector_loop(&self) -> Option<VectorLoop> {
        self.vector
    }

    /// Emits the kernel body and finalizes the function.
    pub fn translate(mut self, config: TargetFrontendConfig) {
        self.translate_comp();
        self.b.finalize(config);
    }

    /// The loop nest over the output, then `return 0`.
    fn translate_comp(&mut self) {
        if self.innermost() >= 0 {
            self.hoist(-1);
        }
        self.translate_output_loops(0);
        let zero = self.b.ins().iconst(types::I64, 0);
        self.b.ins().return_(&[zero]);
    }

    fn fty(&self) -> Type {
        self.precision.float_type()
    }

    fn cl_type(&self, ty: Ty) -> Type {
        match ty {
            Ty::F => self.fty(),
            Ty::I => types::I64,
            Ty::B => types::I8,
        }
    }

    fn innermost(&self) -> i32 {
        self.levels.len() as i32 - 1
    }

    fn n_out(&self) -> usize {
        self.comp.indices.len()
    }

    fn level_of(&self, v: IdxVar) -> Option<usize> {
        self.levels.iter().position(|(w, _)| *w == v)
    }

    fn fconst(&mut self, x: f64) -> Value {
        match self.precision {
            Precision::F32 => self.b.ins().f32const(x as f32),
            Precision::F64 => self.b.ins().f64const(x),
        }
    }

    fn call(&mut self, m: Math, args: &[Value]) -> Value {
        let f = self.helpers.get(m);
        let inst = self.b.ins().call(f, args);
        self.b.inst_results(inst)[0]
    }

    fn lookup(&self, id: usize) -> Option<Value> {
        self.memo.iter().rev().find_map(|m| m.get(&id).copied())
    }

    /// Evaluates, once per iteration of level `level`, every safe term that
    /// depends on no deeper loop. Safe terms cannot fail, so evaluating them
    /// early (or when a branch would skip them) never changes an outcome.
    ///
    /// Cranelift places a pure instruction at its uses (its loop-invariant
    /// code motion left them inside the inner loops here), so each hoisted
    /// value is also stored to a scratch slot: a store stays where it is,
    /// the value is computed before it, and every use the store dominates
    /// reuses that value.
    fn hoist(&mut self, level: i32) {
        let dag = self.dag;
        for (id, t) in dag.terms.iter().enumerate() {
            if t.level == level && t.safe && !t.is_leaf() {
                let v = self.translate_expr(id);
                self.anchor(v);
            }
        }
    }

    /// Stores `v` to the scratch slot (`hoist`).
    fn anchor(&mut self, v: Value) {
        let slot = match self.anchor {
            Some(s) => s,
            None => {
                let s = self.b.create_sized_stack_slot(StackSlotData::new(
                    StackSlotKind::ExplicitSlot,
                    16,
                    4,
                ));
                self.anchor = Some(s);
                s
            }
        };
        self.b.ins().stack_store(types::I64, v, slot, 0);
    }

    // ---- loops -------------------------------------------------------------

    /// `for v in start..end { inner }`, the counter a frontend variable.
    fn translate_loop(&mut self, level: usize, inner: &mut dyn FnMut(&mut Self)) {
        let start = self.bounds[level].0;
        self.b.def_var(self.loop_vars[level], start);
        self.translate_loop_from_here(level, inner);
    }

    /// The loop of `translate_loop` from the counter's current value (where
    /// a vector loop stopped).
    fn translate_loop_from_here(&mut self, level: usize, inner: &mut dyn FnMut(&mut Self)) {
        let var = self.loop_vars[level];
        let end = self.bounds[level].1;
        let header = self.b.create_block();
        let body = self.b.create_block();
        let exit = self.b.create_block();
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let i = self.b.use_var(var);
        let more = self.b.ins().icmp(IntCC::SignedLessThan, i, end);
        self.b.ins().brif(more, body, &[], exit, &[]);
        self.b.switch_to_block(body);
        self.b.seal_block(body);
        self.memo.push(HashMap::new());
        if level as i32 != self.innermost() {
            self.hoist(level as i32);
        }
        inner(self);
        self.memo.pop();
        let i = self.b.use_var(var);
        let next = self.b.ins().iadd_imm_s(i, 1);
        self.b.def_var(var, next);
        self.b.ins().jump(header, &[]);
        self.b.seal_block(header);
        self.b.switch_to_block(exit);
        self.b.seal_block(exit);
    }

    fn translate_output_loops(&mut self, level: usize) {
        if level == self.n_out() {
            self.translate_point();
        } else if self.vector == Some(VectorLoop::Elementwise) && level as i32 == self.innermost() {
            self.translate_vector_loop(level, &mut |t| t.translate_vector_point());
            self.translate_loop_from_here(level, &mut |t| t.translate_output_loops(level + 1));
        } else if self.vector == Some(VectorLoop::Column) && level + 1 == self.n_out() {
            let start = self.bounds[level].0;
            self.b.def_var(self.loop_vars[level], start);
            self.translate_column_steps(level, simd::COLUMN_WIDTH);
            self.translate_column_steps(level, 1);
            self.translate_loop_from_here(level, &mut |t| t.translate_output_loops(level + 1));
        } else {
            self.translate_loop(level, &mut |t| t.translate_output_loops(level + 1));
        }
    }

    /// One output element: its value, converted to the node's dtype, stored
    /// at the running output position (or, accumulating, added there).
    fn translate_point(&mut self) {
        let out_ty = Ty::of(self.dtype);
        let pos = self.b.use_var(self.out_pos);
        let value = match &self.comp.reduce {
            None => {
                let body = self
                    .body
                    .expect("a comprehension without reduction has a body");
                let v = self.translate_expr(body);
                self.convert(v, self.dag.terms[body].ty, out_ty)
            }
            Some(r) if self.counts.is_some() => {
                self.translate_accumulate(r, pos);
                let next = self.b.ins().iadd_imm_s(pos, 1);
                self.b.def_var(self.out_pos, next);
                return;
            }
            Some(r) => self.translate_reduce(r),
        };
        let addr = self.element_addr(self.out_base, pos, out_ty);
        self.b.ins().store(TRUSTED, value, addr, 0);
        // A fusion group's other members at this position: elementwise, or
        // their own reductions over the same loops, one after another (the
        // rows they read are still in cache).
        for k in 0..self.also.len() {
            let (base, body) = self.also[k];
            let v = match &self.comp.reduce {
                None => {
                    let v = self.translate_expr(body);
                    self.convert(v, self.dag.terms[body].ty, out_ty)
                }
                Some(r) => {
                    let main = self.body.replace(body);
                    let v = self.translate_reduce(r);
                    self.body = main;
                    v
                }
            };
            let addr = self.element_addr(base, pos, out_ty);
            self.b.ins().store(TRUSTED, v, addr, 0);
        }
        let next = self.b.ins().iadd_imm_s(pos, 1);
        self.b.def_var(self.out_pos, next);
    }

    /// The address of element `pos` of a buffer of `ty` at `base`.
    fn element_addr(&mut self, base: Value, pos: Value, ty: Ty) -> Value {
        let size = match ty {
            Ty::F => self.precision.bytes(),
            Ty::I => 8,
            Ty::B => 1,
        };
        let bytes = self.b.ins().imul_imm_s(pos, size);
        self.b.ins().iadd(base, bytes)
    }

    /// An accumulating kernel's element: its block's raw fold added to the
    /// output (the sum; for `count`, the count) and its count to the count
    /// buffer. `finalize` in `mod.rs` applies `mean` and `empty` afterwards.
    fn translate_accumulate(&mut self, r: &Reduce, pos: Value) {
        let out_ty = Ty::of(self.dtype);
        let a = self.translate_fold(r);
        let n = self.b.use_var(a.count);
        let raw = match a.acc {
            Some((var, ty)) => {
                let v = self.b.use_var(var);
                self.convert(v, ty, out_ty)
            }
            None => self.convert(n, Ty::I, out_ty),
        };
        let addr = self.element_addr(self.out_base, pos, out_ty);
        let cl = self.cl_type(out_ty);
        let cur = self.b.ins().load(cl, TRUSTED, addr, 0);
        let sum = match out_ty {
            Ty::F => self.b.ins().fadd(cur, raw),
            _ => self.b.ins().iadd(cur, raw),
        };
        self.b.ins().store(TRUSTED, sum, addr, 0);
        let counts = self
            .counts
            .expect("an accumulating kernel has a count buffer");
        let caddr = self.element_addr(counts, pos, Ty::I);
        let c = self.b.ins().load(types::I64, TRUSTED, caddr, 0);
        let c = self.b.ins().iadd(c, n);
        self.b.ins().store(TRUSTED, c, caddr, 0);
    }

    /// The loops of a fold over the reduced levels: when the kernel
    /// vectorises, the innermost one runs `LANES` at a time first
    /// (`simd.rs`: a sum, or logsumexp's maximum), then the rest element by
    /// element.
    fn translate_fold_loops(&mut self, level: usize, a: Acc, item: &mut dyn FnMut(&mut Self)) {
        let innermost = level as i32 == self.innermost();
        match (a.acc, self.vector) {
            (Some((acc, Ty::F)), Some(VectorLoop::Sum)) if innermost => {
                self.translate_vector_sum(level, acc, a.count);
                self.translate_loop_from_here(level, &mut |t| item(t));
            }
            (Some((acc, Ty::F)), Some(VectorLoop::LogSumExp)) if innermost => {
                self.translate_vector_max(level, acc, a.count);
                self.translate_loop_from_here(level, &mut |t| item(t));
            }
            (Some((acc, Ty::F)), Some(VectorLoop::Extreme)) if innermost => {
                self.translate_vector_extreme(level, a.op == RedOp::Max, acc, a.count);
                self.translate_loop_from_here(level, &mut |t| item(t));
            }
            _ if level == self.levels.len() => item(self),
            _ => self.translate_loop(level, &mut |t| t.translate_fold_loops(level + 1, a, item)),
        }
    }

    /// The loops of logsumexp's second pass: `sum += exp(x - m)`, the
    /// innermost loop in lanes first when the kernel vectorises.
    fn translate_exp_sum_loops(
        &mut self,
        level: usize,
        sum: Variable,
        m: Value,
        item: &mut dyn FnMut(&mut Self),
    ) {
        if self.vector == Some(VectorLoop::LogSumExp) && level as i32 == self.innermost() {
            self.translate_vector_exp_sum(level, sum, m);
            self.translate_loop_from_here(level, &mut |t| item(t));
        } else if level == self.levels.len() {
            item(self);
        } else {
            self.translate_loop(level, &mut |t| {
                t.translate_exp_sum_loops(level + 1, sum, m, item)
            });
        }
    }

    // ---- reductions --------------------------------------------------------

    /// A reduction in registers: count, accumulator, and for logsumexp a
    /// second pass (max first, then the sum of shifted exponentials, exactly
    /// the interpreter's two folds). The empty value when nothing passed.
    fn translate_reduce(&mut self, r: &Reduce) -> Value {
        let out_ty = Ty::of(self.dtype);
        let (n, natural, natural_ty) = if self.first_index() {
            let (j, n) = self.translate_first(self.levels.len() - 1);
            (n, j, Ty::I)
        } else {
            self.translate_folded(r)
        };
        let value = self.convert(natural, natural_ty, out_ty);
        let empty = match out_ty {
            Ty::F => self.fconst(r.empty),
            Ty::I => self.b.ins().iconst(types::I64, r.empty as i64),
            Ty::B => self.b.ins().iconst(types::I8, i64::from(r.empty != 0.0)),
        };
        let none = self.b.ins().icmp_imm_s(IntCC::Equal, n, 0);
        self.b.ins().select(none, empty, value)
    }

    /// `min(j | filter) j` over one reduced level, whose filter cannot fail:
    /// the least passing `j` is the first, and nothing after it can change
    /// the value or raise an error, so the loop stops there.
    fn first_index(&self) -> bool {
        let Some(r) = &self.comp.reduce else {
            return false;
        };
        let inner = self.levels.len() - 1;
        r.op == RedOp::Min
            && r.over.len() == 1
            && self.counts.is_none()
            && self
                .body
                .is_some_and(|b| self.dag.terms[b].op == Op::Index(self.levels[inner].0))
            && self.filter.is_none_or(|f| self.dag.terms[f].safe)
    }

    /// The first index of loop `level` that passes the filter, and 1; or 0
    /// and 0 when none does. In lanes first when the kernel vectorises
    /// (`VectorLoop::First`: the first lane of the first step any passes).
    fn translate_first(&mut self, level: usize) -> (Value, Value) {
        let found = self.b.create_block();
        let at = self.b.append_block_param(found, types::I64);
        let n = self.b.append_block_param(found, types::I64);
        let var = self.loop_vars[level];
        let start = self.bounds[level].0;
        self.b.def_var(var, start);
        let hit_at = |t: &mut Self, pass: Value, lane: &dyn Fn(&mut Self) -> Value| {
            let hit = t.b.create_block();
            let go_on = t.b.create_block();
            t.b.ins().brif(pass, hit, &[], go_on, &[]);
            t.b.seal_block(hit);
            t.b.switch_to_block(hit);
            let j = t.b.use_var(var);
            let offset = lane(t);
            let j = t.b.ins().iadd(j, offset);
            let one = t.b.ins().iconst(types::I64, 1);
            t.b.ins()
                .jump(found, &[BlockArg::Value(j), BlockArg::Value(one)]);
            t.b.seal_block(go_on);
            t.b.switch_to_block(go_on);
        };
        if self.vector == Some(VectorLoop::First) {
            self.translate_vector_loop(level, &mut |t| {
                let mask = t.translate_vfirst_mask();
                let any = t.b.ins().vany_true(mask);
                hit_at(t, any, &|t| {
                    let bits = t.b.ins().vhigh_bits(types::I64, mask);
                    t.b.ins().ctz(bits)
                });
            });
        }
        self.translate_loop_from_here(level, &mut |t| {
            let pass = match t.filter {
                Some(f) => {
                    let c = t.translate_expr(f);
                    t.as_b(c, t.dag.terms[f].ty)
                }
                None => t.b.ins().iconst(types::I8, 1),
            };
            hit_at(t, pass, &|t| t.b.ins().iconst(types::I64, 0));
        });
        let zero = self.b.ins().iconst(types::I64, 0);
        self.b
            .ins()
            .jump(found, &[BlockArg::Value(zero), BlockArg::Value(zero)]);
        self.b.seal_block(found);
        self.b.switch_to_block(found);
        (at, n)
    }

    /// The value of a reduction folded over its loops: the count, the value
    /// and its type.
    fn translate_folded(&mut self, r: &Reduce) -> (Value, Value, Ty) {
        let Acc { count, acc, .. } = self.translate_fold(r);
        let n = self.b.use_var(count);
        let (natural, natural_ty) = match (r.op, acc) {
            (RedOp::Count, _) | (_, None) => (n, Ty::I),
            (RedOp::Mean, Some((var, _))) => {
                let sum = self.b.use_var(var);
                let fty = self.fty();
                let nf = self.b.ins().fcvt_from_sint(fty, n);
                (self.b.ins().fdiv(sum, nf), Ty::F)
            }
            (RedOp::LogSumExp, Some((var, _))) => {
                let m = self.b.use_var(var);
                (self.translate_logsumexp_tail(n, m), Ty::F)
            }
            (_, Some((var, ty))) => (self.b.use_var(var), ty),
        };
        (n, natural, natural_ty)
    }

    /// The accumulators of a reduction and its loop nest folding every
    /// element that passes the filter into them.
    fn translate_fold(&mut self, r: &Reduce) -> Acc {
        let out_ty = Ty::of(self.dtype);
        let body_ty = self.body.map_or(Ty::F, |b| self.dag.terms[b].ty);
        let count = self.b.declare_var(types::I64);
        let zero = self.b.ins().iconst(types::I64, 0);
        self.b.def_var(count, zero);
        let acc_ty = match r.op {
            RedOp::Count => None,
            RedOp::Sum if out_ty == Ty::I => Some(Ty::I),
            RedOp::Sum | RedOp::Mean | RedOp::LogSumExp => Some(Ty::F),
            RedOp::Max | RedOp::Min => Some(body_ty),
            RedOp::Any | RedOp::All => Some(Ty::B),
        };
        let acc = acc_ty.map(|ty| {
            let var = self.b.declare_var(self.cl_type(ty));
            let init = match (r.op, ty) {
                (RedOp::LogSumExp, _) => self.fconst(f64::NEG_INFINITY),
                (_, Ty::F) => self.fconst(0.0),
                (RedOp::All, _) => self.b.ins().iconst(types::I8, 1),
                (_, Ty::B) => self.b.ins().iconst(types::I8, 0),
                (_, Ty::I) => self.b.ins().iconst(types::I64, 0),
            };
            self.b.def_var(var, init);
            (var, ty)
        });
        let state = Acc {
            op: r.op,
            count,
            acc,
        };
        let n_out = self.n_out();
        // A filter over the output indices only (a diagonal mask, `j == j2`)
        // is decided once per output element: when it fails, the reduced
        // loops are skipped and nothing is counted. Only a safe filter may
        // move, so errors come in the interpreter's order.
        let outer_filter = self.filter.filter(|f| {
            let t = &self.dag.terms[*f];
            t.safe && t.level < n_out as i32
        });
        let skip = outer_filter.map(|f| {
            let c = self.translate_expr(f);
            let c = self.as_b(c, self.dag.terms[f].ty);
            let pass = self.b.create_block();
            let done = self.b.create_block();
            self.b.ins().brif(c, pass, &[], done, &[]);
            self.b.seal_block(pass);
            self.b.switch_to_block(pass);
            done
        });
        self.translate_fold_loops(n_out, state, &mut |t| {
            t.translate_filtered(&mut |t| t.translate_item(state))
        });
        if let Some(done) = skip {
            self.b.ins().jump(done, &[]);
            self.b.seal_block(done);
            self.b.switch_to_block(done);
        }
        state
    }

    /// `item` when the filter passes (always, without a filter).
    fn translate_filtered(&mut self, item: &mut dyn FnMut(&mut Self)) {
        let Some(f) = self.filter else {
            item(self);
            return;
        };
        let c = self.translate_expr(f);
        let c = self.as_b(c, self.dag.terms[f].ty);
        let pass = self.b.create_block();
        let next = self.b.create_block();
        self.b.ins().brif(c, pass, &[], next, &[]);
        self.b.seal_block(pass);
        self.b.switch_to_block(pass);
        self.memo.push(HashMap::new());
        item(self);
        self.memo.pop();
        self.b.ins().jump(next, &[]);
        self.b.seal_block(next);
        self.b.switch_to_block(next);
    }

    /// One element that passed the filter: fold it into the accumulator,
    /// then count it.
    fn translate_item(&mut self, a: Acc) {
        if let Some((base, body)) = self.column {
            let y = self.translate_expr(body);
            let y = self.convert(y, self.dag.terms[body].ty, Ty::F);
            let j = self.b.use_var(self.loop_vars[self.levels.len() - 1]);
            let addr = self.element_addr(base, j, Ty::F);
            let fty = self.fty();
            let cur = self.b.ins().load(fty, TRUSTED, addr, 0);
            let sum = self.b.ins().fadd(cur, y);
            self.b.ins().store(TRUSTED, sum, addr, 0);
        }
        let n = self.b.use_var(a.count);
        if let (Some(body), Some((var, acc_ty))) = (self.body, a.acc) {
            let body_ty = self.dag.terms[body].ty;
            let x = self.translate_expr(body);
            let cur = self.b.use_var(var);
            let next = match a.op {
                RedOp::Sum | RedOp::Mean => {
                    let x = self.convert(x, body_ty, acc_ty);
                    if acc_ty == Ty::I {
                        self.b.ins().iadd(cur, x)
                    } else {
                        self.b.ins().fadd(cur, x)
                    }
                }
                RedOp::Any | RedOp::All => {
                    let x = self.as_b(x, body_ty);
                    if a.op == RedOp::Any {
                        self.b.ins().bor(cur, x)
                    } else {
                        self.b.ins().band(cur, x)
                    }
                }
                RedOp::Max | RedOp::Min => {
                    // The first extreme wins: replace only on strictly
                    // better, and a NaN beats any number once.
                    let max = a.op == RedOp::Max;
                    let better = match body_ty {
                        Ty::I => self.b.ins().icmp(
                            if max {
                                IntCC::SignedGreaterThan
                            } else {
                                IntCC::SignedLessThan
                            },
                            x,
                            cur,
                        ),
                        Ty::B => self.b.ins().icmp(
                            if max {
                                IntCC::UnsignedGreaterThan
                            } else {
                                IntCC::UnsignedLessThan
                            },
                            x,
                            cur,
                        ),
                        Ty::F => {
                            let cmp = self.b.ins().fcmp(
                                if max {
                                    FloatCC::GreaterThan
                                } else {
                                    FloatCC::LessThan
                                },
                                x,
                                cur,
                            );
                            let x_nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
                            let cur_num = self.b.ins().fcmp(FloatCC::Ordered, cur, cur);
                            let nan_wins = self.b.ins().band(x_nan, cur_num);
                            self.b.ins().bor(cmp, nan_wins)
                        }
                    };
                    let first = self.b.ins().icmp_imm_s(IntCC::Equal, n, 0);
                    let take = self.b.ins().bor(first, better);
                    self.b.ins().select(take, x, cur)
                }
                RedOp::LogSumExp => {
                    // Pass one: the running maximum, NaN ignored (F::max).
                    let x = self.convert(x, body_ty, Ty::F);
                    let gt = self.b.ins().fcmp(FloatCC::GreaterThan, x, cur);
                    self.b.ins().select(gt, x, cur)
                }
                RedOp::Count => cur,
            };
            self.b.def_var(var, next);
        }
        let n1 = self.b.ins().iadd_imm_s(n, 1);
        self.b.def_var(a.count, n1);
    }

    /// After the max pass of logsumexp: `m` when nothing passed or `m` is
    /// infinite, else `m + ln(sum exp(x - m))` from a second pass.
    fn translate_logsumexp_tail(&mut self, n: Value, m: Value) -> Value {
        let fty = self.fty();
        let merge = self.b.create_block();
        let result = self.b.append_block_param(merge, fty);
        let second = self.b.create_block();
        let abs = self.b.ins().fabs(m);
        let inf = self.fconst(f64::INFINITY);
        let is_inf = self.b.ins().fcmp(FloatCC::Equal, abs, inf);
        let empty = self.b.ins().icmp_imm_s(IntCC::Equal, n, 0);
        let mut done = self.b.ins().bor(is_inf, empty);
        // A split logsumexp (`run.rs`): mode 1 gives the block's maximum,
        // mode 2 its sum of `exp(x - m)` for the maximum `m` of all blocks.
        let mut sum_only = None;
        let mut m = m;
        if let Some((mode, given)) = self.split_lse {
            let max_only = self.b.ins().icmp_imm_s(IntCC::Equal, mode, 1);
            let sums = self.b.ins().icmp_imm_s(IntCC::Equal, mode, 2);
            let stop = self.b.ins().bor(done, max_only);
            let not_sums = self.b.ins().bxor_imm_u(sums, 1);
            done = self.b.ins().band(stop, not_sums);
            m = self.b.ins().select(sums, given, m);
            sum_only = Some(sums);
        }
        self.b
            .ins()
            .brif(done, merge, &[BlockArg::Value(m)], second, &[]);
        self.b.seal_block(second);
        self.b.switch_to_block(second);
        let sum = self.b.declare_var(fty);
        let zero = self.fconst(0.0);
        self.b.def_var(sum, zero);
        let body = self.body.expect("logsumexp has a body");
        let body_ty = self.dag.terms[body].ty;
        let n_out = self.n_out();
        // The second pass runs only on this branch: its values must not be
        // remembered past the merge.
        self.memo.push(HashMap::new());
        self.translate_exp_sum_loops(n_out, sum, m, &mut |t| {
            t.translate_filtered(&mut |t| {
                let x = t.translate_expr(body);
                let x = t.convert(x, body_ty, Ty::F);
                let d = t.b.ins().fsub(x, m);
                let e = t.call(Math::Exp, &[d]);
                let s = t.b.use_var(sum);
                let s = t.b.ins().fadd(s, e);
                t.b.def_var(sum, s);
            })
        });
        self.memo.pop();
        let s = self.b.use_var(sum);
        let ln = self.call(Math::Ln, &[s]);
        let mut r = self.b.ins().fadd(m, ln);
        if let Some(sums_only) = sum_only {
            r = self.b.ins().select(sums_only, s, r);
        }
        self.b.ins().jump(merge, &[BlockArg::Value(r)]);
        self.b.seal_block(merge);
        self.b.switch_to_block(merge);
        result
    }

    // ---- scalar expressions ------------------------------------------------

    fn translate_expr(&mut self, id: usize) -> Value {
        if let Some(v) = self.lookup(id) {
            return v;
        }
        let dag = self.dag;
        let term = &dag.terms[id];
        let v = match &term.op {
            Op::Float(bits) => self.fconst(f64::from_bits(*bits)),
            Op::Int(n) => self.b.ins().iconst(types::I64, *n),
            Op::Bool(b) => self.b.ins().iconst(types::I8, i64::from(*b)),
            Op::Index(v) => match self.level_of(*v) {
                Some(l) => self.b.use_var(self.loop_vars[l]),
                None => self.b.ins().iconst(types::I64, 0),
            },
            Op::Size(slot) => self.dim_vals[slot],
            Op::Read(node, at) => self.translate_read(*node, at, &term.checked),
            Op::Unary(op, a) => self.translate_unary(*op, *a),
            Op::Binary(op, a, b) => self.translate_binary(*op, *a, *b, term.ty),
            Op::Select(c, a, b) => self.translate_select(*c, *a, *b, term.ty),
        };
        if let Some(scope) = self.memo.last_mut() {
            scope.insert(id, v);
        }
        v
    }

    /// A read of an earlier node: each index evaluated in order and, unless
    /// proven in range, checked before the next (the interpreter's order, so
    /// the same error comes first); the row-major offset in Horner form.
    fn translate_read(&mut self, node: NodeId, at: &[usize], checked: &[bool]) -> Value {
        let dims = self.read_dims[&node].clone();
        let mut offset: Option<Value> = None;
        for (k, &ix) in at.iter().enumerate() {
            let v = self.translate_expr(ix);
            let v = self.convert(v, self.dag.terms[ix].ty, Ty::I);
            if checked.get(k).copied().unwrap_or(true) {
                let out = self
                    .b
                    .ins()
                    .icmp(IntCC::UnsignedGreaterThanOrEqual, v, dims[k]);
                self.translate_error_if(out, ErrorSite::Index { node, dim: k }, v, dims[k]);
            }
            offset = Some(match offset {
                None => v,
                Some(o) => {
                    let scaled = self.b.ins().imul(o, dims[k]);
                    self.b.ins().iadd(scaled, v)
                }
            });
        }
        let ty = Ty::of(self.graph.node(node).dtype);
        let size = match ty {
            Ty::F => self.precision.bytes(),
            Ty::I => 8,
            Ty::B => 1,
        };
        let base = self.bases[&node];
        let addr = match offset {
            None => base,
            Some(o) => {
                let bytes = self.b.ins().imul_imm_s(o, size);
                self.b.ins().iadd(base, bytes)
            }
        };
        let cl = self.cl_type(ty);
        self.b.ins().load(cl, TRUSTED, addr, 0)
    }

    /// `if cond { err[0] = a; err[1] = b; return site + 1 }`, in a cold block.
    fn translate_error_if(&mut self, cond: Value, site: ErrorSite, a: Value, b: Value) {
        self.sites.push(site);
        let code = self.sites.len() as i64;
        let fail = self.b.create_block();
        let cont = self.b.create_block();
        self.b.set_cold_block(fail);
        self.b.ins().brif(cond, fail, &[], cont, &[]);
        self.b.seal_block(fail);
        self.b.seal_block(cont);
        self.b.switch_to_block(fail);
        self.b.ins().store(TRUSTED, a, self.err, 0);
        self.b.ins().store(TRUSTED, b, self.err, 8);
        let code = self.b.ins().iconst(types::I64, code);
        self.b.ins().return_(&[code]);
        self.b.switch_to_block(cont);
    }

    fn translate_unary(&mut self, op: UnOp, a: usize) -> Value {
        let ty = self.dag.terms[a].ty;
        let x = self.translate_expr(a);
        match (op, ty) {
            (UnOp::Neg, Ty::I) => self.b.ins().ineg(x),
            (UnOp::Abs, Ty::I) => self.b.ins().iabs(x),
            (UnOp::Not, _) => {
                let b = self.as_b(x, ty);
                self.b.ins().bxor_imm_s(b, 1)
            }
            _ => {
                let x = self.convert(x, ty, Ty::F);
                match op {
                    UnOp::Neg | UnOp::Abs | UnOp::Sqrt => self
                        .float_unary_instruction(op, x)
                        .expect("one instruction"),
                    UnOp::Exp => self.call(Math::Exp, &[x]),
                    UnOp::Log => self.call(Math::Ln, &[x]),
                    UnOp::Tanh => self.call(Math::Tanh, &[x]),
                    UnOp::Softplus => self.call(Math::Softplus, &[x]),
                    UnOp::LogSigmoid => self.call(Math::LogSigmoid, &[x]),
                    UnOp::Sigmoid => self.call(Math::Sigmoid, &[x]),
                    UnOp::Relu => {
                        // x when x > 0 or x is NaN, else 0.
                        let zero = self.fconst(0.0);
                        let keep = self.b.ins().fcmp(FloatCC::UnorderedOrGreaterThan, x, zero);
                        self.b.ins().select(keep, x, zero)
                    }
                    UnOp::Detach | UnOp::ToFloat | UnOp::Not => x,
                }
            }
        }
    }

    /// The float unary operations that are one instruction, on scalars and
    /// on vector lanes alike.
    fn float_unary_instruction(&mut self, op: UnOp, x: Value) -> Option<Value> {
        let ins = self.b.ins();
        Some(match op {
            UnOp::Neg => ins.fneg(x),
            UnOp::Abs => ins.fabs(x),
            UnOp::Sqrt => ins.sqrt(x),
            _ => return None,
        })
    }

    fn translate_binary(&mut self, op: BinOp, a: usize, b: usize, result: Ty) -> Value {
        let (ta, tb) = (self.dag.terms[a].ty, self.dag.terms[b].ty);
        let x = self.translate_expr(a);
        let y = self.translate_expr(b);
        match (ta, tb) {
            (Ty::I, Ty::I) => match op {
                BinOp::Add => self.b.ins().iadd(x, y),
                BinOp::Sub => self.b.ins().isub(x, y),
                BinOp::Mul => self.b.ins().imul(x, y),
                BinOp::Rem | BinOp::FloorDiv => self.translate_int_division(op, x, y),
                BinOp::Max | BinOp::ClampMin => self.b.ins().smax(x, y),
                BinOp::Min | BinOp::ClampMax => self.b.ins().smin(x, y),
                BinOp::Eq => self.b.ins().icmp(IntCC::Equal, x, y),
                BinOp::Ne => self.b.ins().icmp(IntCC::NotEqual, x, y),
                BinOp::Lt => self.b.ins().icmp(IntCC::SignedLessThan, x, y),
                BinOp::Le => self.b.ins().icmp(IntCC::SignedLessThanOrEqual, x, y),
                BinOp::Gt => self.b.ins().icmp(IntCC::SignedGreaterThan, x, y),
                BinOp::Ge => self.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, x, y),
                BinOp::Div | BinOp::Pow | BinOp::And | BinOp::Or => {
                    self.b.ins().iconst(types::I64, 0)
                }
            },
            (Ty::B, Ty::B) => match op {
                BinOp::And => self.b.ins().band(x, y),
                BinOp::Or => self.b.ins().bor(x, y),
                BinOp::Eq => self.b.ins().icmp(IntCC::Equal, x, y),
                _ => self.b.ins().icmp(IntCC::NotEqual, x, y),
            },
            (Ty::F, Ty::F) => match op {
                BinOp::Pow => self.call(Math::Pow, &[x, y]),
                BinOp::Max | BinOp::ClampMin => self.translate_nan_extreme(x, y, true),
                BinOp::Min | BinOp::ClampMax => self.translate_nan_extreme(x, y, false),
                BinOp::Rem | BinOp::FloorDiv | BinOp::And | BinOp::Or => self.fconst(f64::NAN),
                _ => self
                    .float_instruction(op, x, y)
                    .expect("every other float operation is one instruction"),
            },
            _ => {
                // Operands of different types: the interpreter's internal
                // error, raised where it would raise it.
                let yes = self.b.ins().iconst(types::I8, 1);
                let zero = self.b.ins().iconst(types::I64, 0);
                self.translate_error_if(yes, ErrorSite::Mixed(op), zero, zero);
                match result {
                    Ty::F => self.fconst(0.0),
                    Ty::I => self.b.ins().iconst(types::I64, 0),
                    Ty::B => self.b.ins().iconst(types::I8, 0),
                }
            }
        }
    }

    /// The float operations that are one instruction, on scalars and on
    /// vector lanes alike (a comparison gives an i8 or a lane mask).
    fn float_instruction(&mut self, op: BinOp, x: Value, y: Value) -> Option<Value> {
        let ins = self.b.ins();
        Some(match op {
            BinOp::Add => ins.fadd(x, y),
            BinOp::Sub => ins.fsub(x, y),
            BinOp::Mul => ins.fmul(x, y),
            BinOp::Div => ins.fdiv(x, y),
            BinOp::Eq => ins.fcmp(FloatCC::Equal, x, y),
            BinOp::Ne => ins.fcmp(FloatCC::NotEqual, x, y),
            BinOp::Lt => ins.fcmp(FloatCC::LessThan, x, y),
            BinOp::Le => ins.fcmp(FloatCC::LessThanOrEqual, x, y),
            BinOp::Gt => ins.fcmp(FloatCC::GreaterThan, x, y),
            BinOp::Ge => ins.fcmp(FloatCC::GreaterThanOrEqual, x, y),
            _ => return None,
        })
    }

    /// `nan_max`/`nan_min`: NaN when either is NaN, else `a` on a tie (which
    /// keeps the sign of a zero exactly as the interpreter does).
    fn translate_nan_extreme(&mut self, a: Value, b: Value, max: bool) -> Value {
        let cc = if max {
            FloatCC::GreaterThanOrEqual
        } else {
            FloatCC::LessThanOrEqual
        };
        let keep_a = self.b.ins().fcmp(cc, a, b);
        let pick = self.b.ins().select(keep_a, a, b);
        let nan = self.b.ins().fcmp(FloatCC::Unordered, a, b);
        let qnan = self.fconst(f64::NAN);
        self.b.ins().select(nan, qnan, pick)
    }

    /// Euclidean `%` and `//` on i64, as `rem_euclid`/`div_euclid`. A zero
    /// divisor is the interpreter's error; `MIN / -1` (which would trap the
    /// machine instruction) is never executed: a divisor of -1 is computed
    /// as negation.
    fn translate_int_division(&mut self, op: BinOp, x: Value, y: Value) -> Value {
        let is_zero = self.b.ins().icmp_imm_s(IntCC::Equal, y, 0);
        let site = if op == BinOp::Rem {
            ErrorSite::RemByZero
        } else {
            ErrorSite::DivByZero
        };
        self.translate_error_if(is_zero, site, x, y);
        let b = &mut self.b;
        let minus_one = b.ins().icmp_imm_s(IntCC::Equal, y, -1);
        let one = b.ins().iconst(types::I64, 1);
        let divisor = b.ins().select(minus_one, one, y);
        let q = b.ins().sdiv(x, divisor);
        let r = b.ins().srem(x, divisor);
        let negative = b.ins().icmp_imm_s(IntCC::SignedLessThan, r, 0);
        if op == BinOp::Rem {
            let abs = b.ins().iabs(y);
            let up = b.ins().iadd(r, abs);
            b.ins().select(negative, up, r)
        } else {
            let positive_divisor = b.ins().icmp_imm_s(IntCC::SignedGreaterThan, y, 0);
            let down = b.ins().iadd_imm_s(q, -1);
            let up = b.ins().iadd_imm_s(q, 1);
            let adjusted = b.ins().select(positive_divisor, down, up);
            let q = b.ins().select(negative, adjusted, q);
            let neg = b.ins().ineg(x);
            b.ins().select(minus_one, neg, q)
        }
    }

    /// `if c then a else b` as control flow: only the taken branch runs (its
    /// reads may be in range only when taken); the value is a block parameter.
    fn translate_select(&mut self, c: usize, a: usize, b: usize, ty: Ty) -> Value {
        let cty = self.dag.terms[c].ty;
        let cv = self.translate_expr(c);
        let cv = self.as_b(cv, cty);
        let then_block = self.b.create_block();
        let else_block = self.b.create_block();
        let merge = self.b.create_block();
        let cl = self.cl_type(ty);
        let result = self.b.append_block_param(merge, cl);
        self.b.ins().brif(cv, then_block, &[], else_block, &[]);
        self.b.seal_block(then_block);
        self.b.seal_block(else_block);
        for (block, branch) in [(then_block, a), (else_block, b)] {
            self.b.switch_to_block(block);
            self.memo.push(HashMap::new());
            let v = self.translate_expr(branch);
            let v = self.convert(v, self.dag.terms[branch].ty, ty);
            self.memo.pop();
            self.b.ins().jump(merge, &[BlockArg::Value(v)]);
        }
        self.b.seal_block(merge);
        self.b.switch_to_block(merge);
        result
    }

    // ---- conversions (the interpreter's as_f / as_i / as_b) ---------------

    fn as_b(&mut self, v: Value, from: Ty) -> Value {
        self.convert(v, from, Ty::B)
    }

    fn convert(&mut self, v: Value, from: Ty, to: Ty) -> Value {
        let fty = self.fty();
        match (from, to) {
            (a, b) if a == b => v,
            (Ty::I, Ty::F) => self.b.ins().fcvt_from_sint(fty, v),
            (Ty::B, Ty::F) => {
                let wide = self.b.ins().uextend(types::I64, v);
                self.b.ins().fcvt_from_sint(fty, wide)
            }
            (Ty::F, Ty::I) => self.call(Math::ToInt, &[v]),
            (Ty::B, Ty::I) => self.b.ins().uextend(types::I64, v),
            (Ty::F, Ty::B) => {
                let zero = self.fconst(0.0);
                self.b.ins().fcmp(FloatCC::NotEqual, v, zero)
            }
            (Ty::I, Ty::B) => self.b.ins().icmp_imm_s(IntCC::NotEqual, v, 0),
            _ => v,
        }
    }
}
