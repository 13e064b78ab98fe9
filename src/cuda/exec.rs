//! Running a program's kernels on a `Machine`: the steps of `stream::plan`
//! (a node whole, or a pass over blocks of rows), buffers allocated as
//! steps need them and, in a lean run, freed after their last reader.
//!
//! * The device keeps a pointer table (every node's buffer) and the dim
//!   table; kernels read both. A pass rewrites the dim table's block symbols
//!   (`codegen::block_symbols`) per block and points each streamed node's
//!   entry at its tile minus the block's first row.
//! * A sibling group's kernel is launched at its last member's step (the
//!   members are consecutive steps), so its members' operands live until
//!   then and its members are freeable only once it ran.
//! * Knows nothing of cudarc: `Gpu` (mod.rs) and the tests' emulation and
//!   counting devices are `Machine`s.

use super::{
    buffer_elem_bytes, check_layout, codegen, elem_bytes, empty_tensor, failed, input_bytes,
    kernel_error, node_shapes, shape_error, tensor_of, Inputs, Machine, Precision, RunOptions,
    GPU_BUDGET,
};
use crate::bind::Bound;
use crate::interp::{Evaluation, Real};
use crate::ir::{Graph, NodeId, NodeKind};
use crate::stream::{self, Pass, Step};
use crate::syntax::{codes, Diagnostic};
use std::collections::BTreeMap;

/// The steps a run of `source` at these sizes takes (`stream::plan` with
/// the GPU's budget).
pub fn steps(
    graph: &Graph,
    source: &codegen::Source,
    p: Precision,
    bound: &Bound,
    opts: RunOptions,
) -> Result<Vec<Step>, Diagnostic> {
    let elems: Vec<usize> = node_shapes(graph, bound)?
        .iter()
        .map(|s| s.iter().product())
        .collect();
    Ok(stream::plan(
        graph,
        &source.stream,
        opts.streaming,
        stream::tile_rows(graph, opts.tile_rows),
        GPU_BUDGET,
        &elems,
        p.bytes() as usize,
        &|d| d.eval(&bound.sizes).map_or(0, |v| v.max(0) as usize),
    ))
}

/// Runs the kernels of `source` on `m` in the steps of `steps` (module
/// doc). Returns the evaluation (streamed nodes, and in a lean run every
/// node but outputs and gradients, are empty) and the peak bytes of node
/// buffers held at once.
#[doc(hidden)]
pub fn execute_on<F: Real, M: Machine>(
    graph: &Graph,
    source: &codegen::Source,
    p: Precision,
    m: &M,
    bound: &Bound,
    opts: RunOptions,
) -> Result<(Evaluation<F>, u64), Diagnostic> {
    if Precision::of::<F>() != Some(p) {
        return Err(failed("internal error: a program run in another precision"));
    }
    check_proofs(source, bound)?;
    let steps = steps(graph, source, p, bound, opts)?;
    let mut run = Exec::new(graph, source, p, m, bound, opts, &steps)?;
    for (si, step) in steps.iter().enumerate() {
        match step {
            Step::Whole(id) => run.whole(*id)?,
            Step::Pass(pass) => run.pass(pass)?,
        }
        run.free_after(step, si);
    }
    run.finish::<F>()
}

/// Unchecked reads stay in range: every proof holds at these sizes.
fn check_proofs(source: &codegen::Source, bound: &Bound) -> Result<(), Diagnostic> {
    for (b, d) in &source.proofs {
        let need = b.eval(&bound.sizes).unwrap_or(0).max(0);
        let have = d.eval(&bound.sizes).unwrap_or(-1);
        if have < need {
            return Err(Diagnostic::error(
                codes::INDEX_RANGE,
                format!("index range {b} = {need} exceeds the dim {d} = {have} it reads"),
            )
            .with_help("these sizes break an assumption of the program's shapes"));
        }
    }
    Ok(())
}

/// The nodes a step computes.
fn step_nodes(s: &Step) -> Vec<NodeId> {
    match s {
        Step::Whole(id) => vec![*id],
        Step::Pass(p) => p.nodes.iter().map(|(id, _)| *id).collect(),
    }
}

/// One run's state on a device.
struct Exec<'r, M: Machine> {
    graph: &'r Graph,
    source: &'r codegen::Source,
    p: Precision,
    m: &'r M,
    bound: &'r Bound,
    lean: bool,
    shapes: Vec<Vec<usize>>,
    elems: Vec<usize>,
    /// Values of the dim table's symbols: the sizes and each region's block.
    block_sizes: BTreeMap<String, i64>,
    dim_values: Vec<i64>,
    dims_buf: M::Buf,
    err_buf: M::Buf,
    table: M::Buf,
    /// The kernel launched at each node's step.
    kernel_of: Vec<Option<usize>>,
    streamed: Vec<bool>,
    /// Copied back at the end.
    keep: Vec<bool>,
    /// The last step reading each node.
    last_use: Vec<Option<usize>>,
    bufs: Vec<Option<M::Buf>>,
    /// Launched (a group's members once the group is): freeable.
    computed: Vec<bool>,
    live: u64,
    peak: u64,
}

impl<'r, M: Machine> Exec<'r, M> {
    fn new(
        graph: &'r Graph,
        source: &'r codegen::Source,
        p: Precision,
        m: &'r M,
        bound: &'r Bound,
        opts: RunOptions,
        steps: &[Step],
    ) -> Result<Self, Diagnostic> {
        let shapes = node_shapes(graph, bound)?;
        let n = graph.nodes.len();
        let elems: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        let mut kernel_of: Vec<Option<usize>> = vec![None; n];
        for (k, kernel) in source.kernels.iter().enumerate() {
            if let Some(last) = kernel.members.last() {
                kernel_of[last.index()] = Some(k);
            }
        }
        let mut streamed = vec![false; n];
        for s in steps {
            if let Step::Pass(pass) = s {
                for id in &pass.streamed {
                    streamed[id.index()] = true;
                }
            }
        }
        let mut keep: Vec<bool> = (0..n).map(|i| !opts.lean && !streamed[i]).collect();
        for (_, id) in graph.outputs.iter().chain(&graph.grads) {
            keep[id.index()] = true;
        }
        let mut block_sizes = bound.sizes.clone();
        for (k, region) in source.stream.regions.iter().enumerate() {
            let (lo, len) = codegen::block_symbols(k);
            let rows = region.row.eval(&bound.sizes).unwrap_or(0).max(0);
            block_sizes.insert(lo, 0);
            block_sizes.insert(len, rows);
        }
        let dim_values = dim_table(source, &block_sizes);
        Ok(Exec {
            graph,
            source,
            p,
            m,
            bound,
            lean: opts.lean,
            last_use: last_uses(graph, source, steps),
            shapes,
            elems,
            block_sizes,
            dims_buf: m.upload(&words(&dim_values))?,
            dim_values,
            err_buf: m.alloc(3 * 8)?,
            table: m.alloc(n.max(1) * 8)?,
            kernel_of,
            streamed,
            keep,
            bufs: (0..n).map(|_| None).collect(),
            computed: vec![false; n],
            live: 0,
            peak: 0,
        })
    }

    /// Binds region `region`'s block to rows `lo .. lo + len` in the dim
    /// table, on the host and on the device.
    fn set_block(&mut self, region: usize, lo: usize, len: usize) -> Result<(), Diagnostic> {
        let (lo_sym, len_sym) = codegen::block_symbols(region);
        self.block_sizes.insert(lo_sym, lo as i64);
        self.block_sizes.insert(len_sym, len as i64);
        self.dim_values = dim_table(self.source, &self.block_sizes);
        self.m
            .write(&mut self.dims_buf, 0, &words(&self.dim_values))
    }

    fn set_address(&mut self, i: usize, address: u64) -> Result<(), Diagnostic> {
        self.m.write(&mut self.table, i * 8, &address.to_ne_bytes())
    }

    /// Node `i`'s buffer: its input's elements, or zeroed room for its value
    /// (and a reduction's scratch, `codegen::Kernel`), or a tile of `rows`;
    /// held, and published in the pointer table.
    fn allocate(&mut self, i: usize, rows: Option<usize>) -> Result<(), Diagnostic> {
        let node = &self.graph.nodes[i];
        let bytes = self.elems[i] * elem_bytes(node.dtype, self.p);
        let kernel = self.kernel_of[i].map(|k| &self.source.kernels[k]);
        let buf = match (&node.kind, rows, kernel) {
            (NodeKind::Input { .. }, ..) => self.upload_input(i)?,
            (_, Some(rows), _) => {
                let per_row = bytes / self.shapes[i].first().copied().unwrap_or(1).max(1);
                self.m.alloc(rows * per_row)?
            }
            (_, None, Some(k)) if matches!(k.launch, codegen::Launch::Scalar { .. }) => {
                self.m.alloc(bytes + 8 + codegen::SCALAR_SCRATCH)?
            }
            (_, None, Some(k)) if k.state => self.m.alloc(24 * self.elems[i])?,
            _ => self.m.alloc(bytes)?,
        };
        self.live += self.m.size(&buf) as u64;
        self.peak = self.peak.max(self.live);
        let address = self.m.address(&buf);
        self.bufs[i] = Some(buf);
        self.set_address(i, address)
    }

    fn upload_input(&self, i: usize) -> Result<M::Buf, Diagnostic> {
        let node = &self.graph.nodes[i];
        let bf16 = self.source.inputs == Inputs::Bf16;
        let bytes = self.elems[i] * buffer_elem_bytes(node.dtype, self.p, bf16);
        let input = self
            .bound
            .input(NodeId(i as u32))
            .ok_or_else(|| Diagnostic::error(codes::MISSING_TENSOR, "an input was not bound"))?;
        let data = match self.p {
            Precision::F32 => input_bytes::<f32>(&input.tensor.data, node.dtype, bf16),
            Precision::F64 => input_bytes::<f64>(&input.tensor.data, node.dtype, bf16),
        };
        if data.len() != bytes {
            return Err(shape_error(format!(
                "input `{}` does not match its shape",
                input.name
            )));
        }
        self.m.upload(&data)
    }

    /// Launches the kernel at node `i`'s step, if any.
    fn launch(&self, i: usize) -> Result<(), Diagnostic> {
        let Some(k) = self.kernel_of[i] else {
            return Ok(());
        };
        let args = [&self.table, &self.dims_buf, &self.err_buf];
        let kernel = &self.source.kernels[k];
        self.m.launch(k, &kernel.launch, &self.dim_values, args)
    }

    fn whole(&mut self, id: NodeId) -> Result<(), Diagnostic> {
        let i = id.index();
        check_layout(self.graph, &self.shapes, i, self.bound)?;
        self.allocate(i, None)?;
        self.launch(i)?;
        match self.kernel_of[i] {
            Some(k) => {
                for m in &self.source.kernels[k].members {
                    self.computed[m.index()] = true;
                }
            }
            None => {
                let in_group = self.source.kernels.iter().any(|k| k.members.contains(&id));
                self.computed[i] = !in_group;
            }
        }
        Ok(())
    }

    /// A pass: its members' buffers (tiles for streamed nodes), then every
    /// member's kernel per block of rows, then the block back to all rows.
    fn pass(&mut self, pass: &Pass) -> Result<(), Diagnostic> {
        let region = pass
            .nodes
            .iter()
            .find_map(|(id, _)| {
                self.kernel_of[id.index()].and_then(|k| self.source.kernels[k].ranged)
            })
            .map(|(region, _)| region)
            .ok_or_else(|| failed("internal error: a pass without a ranged kernel"))?;
        for (id, _) in &pass.nodes {
            let i = id.index();
            self.allocate(i, self.streamed[i].then_some(pass.tile_rows))?;
        }
        let mut lo = 0;
        while lo < pass.rows {
            let len = pass.tile_rows.min(pass.rows - lo);
            self.set_block(region, lo, len)?;
            // A tile holds rows lo .. lo + len: its entry points at where row
            // 0 would be, so kernels index absolutely.
            for id in &pass.streamed {
                let i = id.index();
                let row_bytes = (self.elems[i] / self.shapes[i][0].max(1))
                    * elem_bytes(self.graph.nodes[i].dtype, self.p);
                let tile = self.bufs[i].as_ref().map_or(0, |b| self.m.address(b));
                self.set_address(i, tile.wrapping_sub((lo * row_bytes) as u64))?;
            }
            for (id, _) in &pass.nodes {
                self.launch(id.index())?;
            }
            lo += len;
        }
        for (id, _) in &pass.nodes {
            self.computed[id.index()] = true;
        }
        self.set_block(region, 0, pass.rows)
    }

    /// Frees what no later step reads: in a lean run every such node that
    /// is no output or gradient; streamed tiles always.
    fn free_after(&mut self, step: &Step, si: usize) {
        for id in step_nodes(step) {
            let mut dead = self.graph.operands(id);
            dead.push(id);
            for o in dead {
                let i = o.index();
                let unread = self.last_use[i].is_none_or(|s| s <= si);
                let streamed = self.streamed[i];
                let freeable = self.computed[i] && !self.keep[i] && (self.lean || streamed);
                if (unread || streamed) && freeable {
                    if let Some(b) = self.bufs[i].take() {
                        self.live -= self.m.size(&b) as u64;
                    }
                }
            }
        }
    }

    /// The error word as the interpreter's diagnostic, or every kept node's
    /// value, and the peak.
    fn finish<F: Real>(self) -> Result<(Evaluation<F>, u64), Diagnostic> {
        let err = self.m.download(&self.err_buf)?;
        let word = |k: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&err[k * 8..k * 8 + 8]);
            i64::from_ne_bytes(b)
        };
        if word(0) != 0 {
            let (status, operands) = (word(0), [word(1), word(2)]);
            return Err(kernel_error(
                self.graph,
                self.source,
                &self.shapes,
                status,
                operands,
            ));
        }
        let mut values = Vec::with_capacity(self.graph.nodes.len());
        for (i, node) in self.graph.nodes.iter().enumerate() {
            match (&self.bufs[i], self.keep[i]) {
                (Some(b), true) => {
                    let bf16 = self.source.inputs == Inputs::Bf16
                        && matches!(node.kind, NodeKind::Input { .. });
                    let mut host = self.m.download(b)?;
                    host.truncate(self.elems[i] * buffer_elem_bytes(node.dtype, self.p, bf16));
                    values.push(tensor_of::<F>(&host, node.dtype, &self.shapes[i], bf16)?);
                }
                _ => values.push(empty_tensor(node.dtype)),
            }
        }
        let outputs = crate::interp::scalar_outputs(self.graph, &values);
        Ok((Evaluation { outputs, values }, self.peak))
    }
}

/// The dim table's values under `sizes`.
fn dim_table(source: &codegen::Source, sizes: &BTreeMap<String, i64>) -> Vec<i64> {
    source
        .dims
        .iter()
        .map(|d| d.eval(sizes).unwrap_or(0))
        .collect()
}

fn words(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|d| d.to_ne_bytes()).collect()
}

/// The last step reading each node. A group's members read their operands
/// when the group is launched, at its last member's step.
fn last_uses(graph: &Graph, source: &codegen::Source, steps: &[Step]) -> Vec<Option<usize>> {
    let n = graph.nodes.len();
    let mut step_of = vec![0; n];
    for (si, step) in steps.iter().enumerate() {
        for id in step_nodes(step) {
            step_of[id.index()] = si;
        }
    }
    for kernel in &source.kernels {
        if let Some(last) = kernel.members.last() {
            for m in &kernel.members {
                step_of[m.index()] = step_of[last.index()];
            }
        }
    }
    let mut last_use: Vec<Option<usize>> = vec![None; n];
    for (i, step) in step_of.iter().enumerate() {
        for o in graph.operands(NodeId(i as u32)) {
            let at = last_use[o.index()].map_or(*step, |s| s.max(*step));
            last_use[o.index()] = Some(at);
        }
    }
    last_use
}
