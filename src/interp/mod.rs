//! The reference interpreter: evaluates the graph node by node on ndarray, in
//! f32 or f64. Every other backend is checked against it, so it favours
//! clarity over speed: a comprehension is a loop over its output positions
//! and, for a reduction, over the reduced indices, walking the scalar body.
//!
//! It never sees a schedule, never fuses, and reads only bound, checked
//! inputs. Out-of-range data-dependent indices are runtime diagnostics.

use crate::bind::Bound;
use crate::ir::{BinOp, Comp, DType, Expr, Graph, NodeId, NodeKind, RedOp, UnOp};
use crate::syntax::{codes, Diagnostic};
use crate::tensor_io::TensorData;
use ndarray::{ArrayD, Axis, IxDyn};
use num_traits::{Float, FromPrimitive, ToPrimitive};
use std::fmt::Debug;

/// A float type the interpreter can run in.
pub trait Real:
    Float + FromPrimitive + ToPrimitive + Debug + Default + Send + Sync + 'static
{
    /// lossc's `exp` (`crate::math`), the same bits on every CPU backend.
    fn exp_lossc(self) -> Self;
}
impl Real for f32 {
    fn exp_lossc(self) -> f32 {
        crate::math::exp_f32(self)
    }
}
impl Real for f64 {
    fn exp_lossc(self) -> f64 {
        crate::math::exp_f64(self)
    }
}

/// The value of one node.
#[derive(Clone, Debug)]
pub enum Tensor<F> {
    F(ArrayD<F>),
    I(ArrayD<i64>),
    B(ArrayD<bool>),
}

/// A scalar during body evaluation.
#[derive(Clone, Copy, Debug)]
enum S<F> {
    F(F),
    I(i64),
    B(bool),
}

/// The outputs (loss first, then components) and every node's value.
pub struct Evaluation<F> {
    pub outputs: Vec<(String, F)>,
    pub values: Vec<Tensor<F>>,
}

type Rt<T> = Result<T, Diagnostic>;

/// The error a run of `graph` reports, for a backend that found `fallback`
/// before running anything (a size it cannot evaluate): the interpreter's
/// first error in node order, which an earlier node may raise (an index out
/// of range that makes the size negative), else `fallback`.
pub fn first_error(graph: &Graph, bound: &Bound, fallback: Diagnostic) -> Diagnostic {
    evaluate::<f64>(graph, bound).err().unwrap_or(fallback)
}

pub fn evaluate<F: Real>(graph: &Graph, bound: &Bound) -> Rt<Evaluation<F>> {
    let mut values: Vec<Tensor<F>> = Vec::with_capacity(graph.nodes.len());
    for (i, node) in graph.nodes.iter().enumerate() {
        let id = NodeId(i as u32);
        let shape = node_shape(graph, bound, id)?;
        let v = match &node.kind {
            NodeKind::Input { .. } => input_value(bound, id)?,
            NodeKind::Comp(c) => Interp {
                graph,
                bound,
                values: &values,
            }
            .comp(c, node.dtype, &shape)?,
            NodeKind::Concat { axis, parts } => concat(&values, parts, *axis)?,
            NodeKind::Slice { src, axis, start } => {
                let s = start.eval(&bound.sizes).unwrap_or(0) as usize;
                slice(&values[src.index()], *axis, s, shape[*axis])
            }
            NodeKind::Reshape { src } => reshape(&values[src.index()], &shape)?,
        };
        values.push(v);
    }
    let outputs = scalar_outputs(graph, &values);
    Ok(Evaluation { outputs, values })
}

/// The value of comprehension `id` from the values of the nodes it reads
/// (`values` has an entry for every earlier node; the others may be
/// placeholders): the reference for a node another backend cannot run.
pub fn comprehension<F: Real>(
    graph: &Graph,
    bound: &Bound,
    values: &[Tensor<F>],
    id: NodeId,
) -> Rt<Tensor<F>> {
    let shape = node_shape(graph, bound, id)?;
    let node = graph.node(id);
    let NodeKind::Comp(c) = &node.kind else {
        return Err(Diagnostic::error(
            codes::TENSOR_SHAPE,
            format!("internal error: %{} is not a comprehension", id.index()),
        ));
    };
    Interp {
        graph,
        bound,
        values,
    }
    .comp(c, node.dtype, &shape)
}

/// The graph's named outputs, read from the node values (every backend
/// reports them this way; a non-float or empty value is NaN).
pub fn scalar_outputs<F: Real>(graph: &Graph, values: &[Tensor<F>]) -> Vec<(String, F)> {
    graph
        .outputs
        .iter()
        .map(|(name, id)| {
            let x = match &values[id.index()] {
                Tensor::F(a) => a.iter().next().copied().unwrap_or_else(F::nan),
                _ => F::nan(),
            };
            (name.clone(), x)
        })
        .collect()
}

/// The diagnostic for a read at `index` outside dim `dim` (of `size`) of
/// `node`: the interpreter's, which every backend reports word for word.
pub fn index_error(graph: &Graph, node: NodeId, dim: usize, index: i64, size: i64) -> Diagnostic {
    let name = graph
        .node(node)
        .name
        .clone()
        .unwrap_or_else(|| format!("%{}", node.0));
    Diagnostic::error(
        codes::INDEX_RANGE,
        format!("index {index} is out of range for dim {dim} (size {size}) of `{name}`"),
    )
    .with_help("an int tensor used as an index (e.g. labels) holds a value outside the indexed dim")
}

fn node_shape(graph: &Graph, bound: &Bound, id: NodeId) -> Rt<Vec<usize>> {
    graph
        .node(id)
        .shape
        .iter()
        .map(|d| match d.eval(&bound.sizes) {
            Some(v) if v >= 0 => Ok(v as usize),
            _ => Err(Diagnostic::error(
                codes::TENSOR_SHAPE,
                format!("the size {d} is unknown or negative for these inputs"),
            )),
        })
        .collect()
}

fn input_value<F: Real>(bound: &Bound, id: NodeId) -> Rt<Tensor<F>> {
    let b = bound
        .input(id)
        .ok_or_else(|| Diagnostic::error(codes::MISSING_TENSOR, "an input was not bound"))?;
    let shape = IxDyn(&b.tensor.shape);
    let bad = |_| {
        Diagnostic::error(
            codes::TENSOR_SHAPE,
            format!("input `{}` does not match its shape", b.name),
        )
    };
    Ok(match &b.tensor.data {
        TensorData::F64(v) => Tensor::F(
            ArrayD::from_shape_vec(
                shape,
                v.iter()
                    .map(|x| F::from_f64(*x).unwrap_or_else(F::nan))
                    .collect(),
            )
            .map_err(bad)?,
        ),
        TensorData::F32(v) => Tensor::F(
            ArrayD::from_shape_vec(
                shape,
                v.iter()
                    .map(|x| F::from_f32(*x).unwrap_or_else(F::nan))
                    .collect(),
            )
            .map_err(bad)?,
        ),
        TensorData::I64(v) => Tensor::I(ArrayD::from_shape_vec(shape, v.clone()).map_err(bad)?),
        TensorData::Bool(v) => Tensor::B(ArrayD::from_shape_vec(shape, v.clone()).map_err(bad)?),
    })
}

fn concat<F: Real>(values: &[Tensor<F>], parts: &[NodeId], axis: usize) -> Rt<Tensor<F>> {
    let err = |e: ndarray::ShapeError| {
        Diagnostic::error(codes::TENSOR_SHAPE, format!("concat failed: {e}"))
    };
    macro_rules! join {
        ($variant:ident) => {{
            let views: Vec<_> = parts
                .iter()
                .map(|p| match &values[p.index()] {
                    Tensor::$variant(a) => Ok(a.view()),
                    _ => Err(Diagnostic::error(
                        codes::TENSOR_DTYPE,
                        "concat of mixed dtypes",
                    )),
                })
                .collect::<Rt<_>>()?;
            Tensor::$variant(ndarray::concatenate(Axis(axis), &views).map_err(err)?)
        }};
    }
    Ok(match &values[parts[0].index()] {
        Tensor::F(_) => join!(F),
        Tensor::I(_) => join!(I),
        Tensor::B(_) => join!(B),
    })
}

fn slice<F: Real>(v: &Tensor<F>, axis: usize, start: usize, len: usize) -> Tensor<F> {
    let range = ndarray::Slice::from(start..start + len);
    match v {
        Tensor::F(a) => Tensor::F(a.slice_axis(Axis(axis), range).to_owned()),
        Tensor::I(a) => Tensor::I(a.slice_axis(Axis(axis), range).to_owned()),
        Tensor::B(a) => Tensor::B(a.slice_axis(Axis(axis), range).to_owned()),
    }
}

fn reshape<F: Real>(v: &Tensor<F>, shape: &[usize]) -> Rt<Tensor<F>> {
    let err = |e: ndarray::ShapeError| {
        Diagnostic::error(codes::TENSOR_SHAPE, format!("reshape failed: {e}"))
    };
    Ok(match v {
        Tensor::F(a) => Tensor::F(
            ArrayD::from_shape_vec(IxDyn(shape), a.iter().copied().collect()).map_err(err)?,
        ),
        Tensor::I(a) => Tensor::I(
            ArrayD::from_shape_vec(IxDyn(shape), a.iter().copied().collect()).map_err(err)?,
        ),
        Tensor::B(a) => Tensor::B(
            ArrayD::from_shape_vec(IxDyn(shape), a.iter().copied().collect()).map_err(err)?,
        ),
    })
}

struct Interp<'a, F> {
    graph: &'a Graph,
    bound: &'a Bound,
    values: &'a [Tensor<F>],
}

impl<F: Real> Interp<'_, F> {
    fn comp(&self, c: &Comp, dtype: DType, shape: &[usize]) -> Rt<Tensor<F>> {
        let mut env = vec![0i64; self.graph.index_names.len()];
        let n: usize = shape.iter().product();
        let mut out: Vec<S<F>> = Vec::with_capacity(n);
        let mut pos = vec![0usize; shape.len()];
        for flat in 0..n {
            if flat > 0 {
                advance(&mut pos, shape);
            }
            for (v, p) in c.indices.iter().zip(&pos) {
                env[v.0 as usize] = *p as i64;
            }
            out.push(match &c.reduce {
                None => self.eval(&c.body, &env)?,
                Some(r) => self.reduce(r, &c.body, &mut env, dtype)?,
            });
        }
        let dims = IxDyn(shape);
        let bad = |e: ndarray::ShapeError| {
            Diagnostic::error(codes::TENSOR_SHAPE, format!("internal shape error: {e}"))
        };
        Ok(match dtype {
            DType::Float => Tensor::F(
                ArrayD::from_shape_vec(dims, out.into_iter().map(|s| self.as_f(s)).collect())
                    .map_err(bad)?,
            ),
            DType::Int => Tensor::I(
                ArrayD::from_shape_vec(dims, out.into_iter().map(as_i).collect()).map_err(bad)?,
            ),
            DType::Bool => Tensor::B(
                ArrayD::from_shape_vec(dims, out.into_iter().map(as_b).collect()).map_err(bad)?,
            ),
        })
    }

    fn reduce(
        &self,
        r: &crate::ir::Reduce,
        body: &Expr,
        env: &mut [i64],
        dtype: DType,
    ) -> Rt<S<F>> {
        let extents: Vec<usize> = r
            .over
            .iter()
            .map(|(_, d)| d.eval(&self.bound.sizes).unwrap_or(0).max(0) as usize)
            .collect();
        let total: usize = extents.iter().product();
        let mut pos = vec![0usize; extents.len()];
        let mut items: Vec<S<F>> = Vec::new();
        for flat in 0..total {
            if flat > 0 {
                advance(&mut pos, &extents);
            }
            for ((v, _), p) in r.over.iter().zip(&pos) {
                env[v.0 as usize] = *p as i64;
            }
            if let Some(f) = &r.filter {
                if !as_b(self.eval(f, env)?) {
                    continue;
                }
            }
            items.push(if r.op == RedOp::Count {
                S::B(true)
            } else {
                self.eval(body, env)?
            });
        }
        let empty = || match dtype {
            DType::Float => S::F(F::from_f64(r.empty).unwrap_or_else(F::nan)),
            DType::Int => S::I(r.empty as i64),
            DType::Bool => S::B(r.empty != 0.0),
        };
        if items.is_empty() {
            return Ok(empty());
        }
        Ok(match r.op {
            RedOp::Count => S::I(items.len() as i64),
            RedOp::Any => S::B(items.iter().any(|s| as_b(*s))),
            RedOp::All => S::B(items.iter().all(|s| as_b(*s))),
            RedOp::Sum if dtype == DType::Int => S::I(items.iter().map(|s| as_i(*s)).sum()),
            RedOp::Sum => S::F(items.iter().fold(F::zero(), |a, s| a + self.as_f(*s))),
            RedOp::Mean => {
                let sum = items.iter().fold(F::zero(), |a, s| a + self.as_f(*s));
                S::F(sum / F::from_usize(items.len()).unwrap_or_else(F::one))
            }
            // The first extreme wins a tie: the lowest index, as the reference.
            RedOp::Max | RedOp::Min => {
                let better = |a: S<F>, b: S<F>| match (a, b) {
                    (S::I(x), S::I(y)) => {
                        if r.op == RedOp::Max {
                            x > y
                        } else {
                            x < y
                        }
                    }
                    (x, y) => {
                        let (x, y) = (self.as_f(x), self.as_f(y));
                        x.is_nan() && !y.is_nan() || if r.op == RedOp::Max { x > y } else { x < y }
                    }
                };
                items
                    .iter()
                    .skip(1)
                    .fold(items[0], |best, s| if better(*s, best) { *s } else { best })
            }
            RedOp::LogSumExp => {
                let xs: Vec<F> = items.iter().map(|s| self.as_f(*s)).collect();
                let m = xs.iter().copied().fold(F::neg_infinity(), F::max);
                if m.is_infinite() {
                    S::F(m)
                } else {
                    let s = xs.iter().fold(F::zero(), |a, x| a + (*x - m).exp_lossc());
                    S::F(m + s.ln())
                }
            }
        })
    }

    fn as_f(&self, s: S<F>) -> F {
        match s {
            S::F(x) => x,
            S::I(n) => F::from_i64(n).unwrap_or_else(F::nan),
            S::B(b) => {
                if b {
                    F::one()
                } else {
                    F::zero()
                }
            }
        }
    }

    fn eval(&self, e: &Expr, env: &[i64]) -> Rt<S<F>> {
        Ok(match e {
            Expr::Float(x) => S::F(F::from_f64(*x).unwrap_or_else(F::nan)),
            Expr::Int(n) => S::I(*n),
            Expr::Bool(b) => S::B(*b),
            Expr::Index(v) => S::I(env[v.0 as usize]),
            Expr::Size(d) => S::I(d.eval(&self.bound.sizes).unwrap_or(0)),
            Expr::Read { node, at } => self.read(*node, at, env)?,
            Expr::Unary(op, a) => {
                let a = self.eval(a, env)?;
                unary(*op, a, |s| self.as_f(s))
            }
            Expr::Binary(op, a, b) => {
                let a = self.eval(a, env)?;
                let b = self.eval(b, env)?;
                binary(*op, a, b)?
            }
            Expr::Select(c, a, b) => {
                if as_b(self.eval(c, env)?) {
                    self.eval(a, env)?
                } else {
                    self.eval(b, env)?
                }
            }
        })
    }

    fn read(&self, node: NodeId, at: &[Expr], env: &[i64]) -> Rt<S<F>> {
        let mut idx = Vec::with_capacity(at.len());
        let value = &self.values[node.index()];
        let shape = match value {
            Tensor::F(a) => a.shape(),
            Tensor::I(a) => a.shape(),
            Tensor::B(a) => a.shape(),
        };
        for (k, e) in at.iter().enumerate() {
            let i = as_i(self.eval(e, env)?);
            if i < 0 || i as usize >= shape[k] {
                return Err(index_error(self.graph, node, k, i, shape[k] as i64));
            }
            idx.push(i as usize);
        }
        let ix = IxDyn(&idx);
        Ok(match value {
            Tensor::F(a) => S::F(a[&ix]),
            Tensor::I(a) => S::I(a[&ix]),
            Tensor::B(a) => S::B(a[&ix]),
        })
    }
}

/// Row-major odometer step.
fn advance(pos: &mut [usize], shape: &[usize]) {
    for k in (0..pos.len()).rev() {
        pos[k] += 1;
        if pos[k] < shape[k] {
            return;
        }
        pos[k] = 0;
    }
}

fn as_i<F: Real>(s: S<F>) -> i64 {
    match s {
        S::I(n) => n,
        S::B(b) => i64::from(b),
        S::F(x) => x.to_i64().unwrap_or(0),
    }
}

fn as_b<F: Real>(s: S<F>) -> bool {
    match s {
        S::B(b) => b,
        S::I(n) => n != 0,
        S::F(x) => x != F::zero(),
    }
}

fn nan_max<F: Real>(a: F, b: F) -> F {
    if a.is_nan() || b.is_nan() {
        F::nan()
    } else if a >= b {
        a
    } else {
        b
    }
}

fn nan_min<F: Real>(a: F, b: F) -> F {
    if a.is_nan() || b.is_nan() {
        F::nan()
    } else if a <= b {
        a
    } else {
        b
    }
}

fn unary<F: Real>(op: UnOp, a: S<F>, as_f: impl Fn(S<F>) -> F) -> S<F> {
    match (op, a) {
        (UnOp::Neg, S::I(n)) => S::I(-n),
        (UnOp::Abs, S::I(n)) => S::I(n.abs()),
        (UnOp::Not, s) => S::B(!as_b(s)),
        (UnOp::ToFloat, s) => S::F(as_f(s)),
        (op, s) => {
            let x = as_f(s);
            let zero = F::zero();
            S::F(match op {
                UnOp::Neg => -x,
                UnOp::Abs => x.abs(),
                UnOp::Exp => x.exp_lossc(),
                UnOp::Log => x.ln(),
                UnOp::Sqrt => x.sqrt(),
                UnOp::Relu => {
                    if x.is_nan() || x > zero {
                        x
                    } else {
                        zero
                    }
                }
                // log(1 + e^x) = max(x, 0) + log1p(e^-|x|), exact and overflow-free.
                UnOp::Softplus => nan_max(x, zero) + (-x.abs()).exp().ln_1p(),
                UnOp::LogSigmoid => nan_min(x, zero) - (-x.abs()).exp().ln_1p(),
                UnOp::Sigmoid => {
                    if x >= zero {
                        F::one() / (F::one() + (-x).exp())
                    } else {
                        let e = x.exp();
                        e / (F::one() + e)
                    }
                }
                UnOp::Tanh => x.tanh(),
                UnOp::Detach | UnOp::ToFloat | UnOp::Not => x,
            })
        }
    }
}

fn binary<F: Real>(op: BinOp, a: S<F>, b: S<F>) -> Rt<S<F>> {
    Ok(match (a, b) {
        (S::I(x), S::I(y)) => match op {
            BinOp::Add => S::I(x.wrapping_add(y)),
            BinOp::Sub => S::I(x.wrapping_sub(y)),
            BinOp::Mul => S::I(x.wrapping_mul(y)),
            BinOp::Rem => {
                if y == 0 {
                    return Err(Diagnostic::error(
                        codes::INDEX_RANGE,
                        "integer remainder by zero",
                    ));
                }
                S::I(x.rem_euclid(y))
            }
            BinOp::FloorDiv => {
                if y == 0 {
                    return Err(Diagnostic::error(
                        codes::INDEX_RANGE,
                        "integer division by zero",
                    ));
                }
                S::I(x.div_euclid(y))
            }
            BinOp::Max | BinOp::ClampMin => S::I(x.max(y)),
            BinOp::Min | BinOp::ClampMax => S::I(x.min(y)),
            BinOp::Eq => S::B(x == y),
            BinOp::Ne => S::B(x != y),
            BinOp::Lt => S::B(x < y),
            BinOp::Le => S::B(x <= y),
            BinOp::Gt => S::B(x > y),
            BinOp::Ge => S::B(x >= y),
            BinOp::Div | BinOp::Pow | BinOp::And | BinOp::Or => S::I(0),
        },
        (S::B(x), S::B(y)) => match op {
            BinOp::And => S::B(x && y),
            BinOp::Or => S::B(x || y),
            BinOp::Eq => S::B(x == y),
            _ => S::B(x != y),
        },
        (S::F(x), S::F(y)) => match op {
            BinOp::Add => S::F(x + y),
            BinOp::Sub => S::F(x - y),
            BinOp::Mul => S::F(x * y),
            BinOp::Div => S::F(x / y),
            BinOp::Pow => S::F(x.powf(y)),
            BinOp::Max | BinOp::ClampMin => S::F(nan_max(x, y)),
            BinOp::Min | BinOp::ClampMax => S::F(nan_min(x, y)),
            BinOp::Eq => S::B(x == y),
            BinOp::Ne => S::B(x != y),
            BinOp::Lt => S::B(x < y),
            BinOp::Le => S::B(x <= y),
            BinOp::Gt => S::B(x > y),
            BinOp::Ge => S::B(x >= y),
            BinOp::Rem | BinOp::FloorDiv | BinOp::And | BinOp::Or => S::F(F::nan()),
        },
        _ => {
            return Err(Diagnostic::error(
                codes::TYPE_MISMATCH,
                format!("internal error: `{}` on mixed scalar types", op.symbol()),
            ))
        }
    })
}
