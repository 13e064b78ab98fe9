//! Binding tensors to a graph's inputs: names, dtypes, shapes and sizes.
//!
//! Every backend runs on a `Bound`: the runtime value of each symbolic dim,
//! and one checked tensor per input. Binding is where user tensors meet the
//! program, so every mismatch (missing, extra, wrong rank, wrong size, wrong
//! dtype, NaN) is a diagnostic naming the tensor and what was expected. No
//! backend ever sees an unchecked tensor.

use crate::ir::{dim::shape_string, DType, Dim, Graph, NodeId};
use crate::syntax::{codes, Diagnostic};
use crate::tensor_io::{HostTensor, TensorData, TensorMap};
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub struct BoundInput {
    pub node: NodeId,
    pub name: String,
    /// The file's key for each column of a variadic input (`negative_1`, ...);
    /// for other inputs, the one key it was read from.
    pub columns: Vec<String>,
    /// Row-major data: f64 for float inputs, i64 for int, bool for bool.
    pub tensor: HostTensor,
    /// A variadic input given column by column: its gradient is split the same way.
    pub split_columns: bool,
}

#[derive(Clone, Debug)]
pub struct Bound {
    pub sizes: BTreeMap<String, i64>,
    pub inputs: Vec<BoundInput>,
}

impl Bound {
    pub fn input(&self, node: NodeId) -> Option<&BoundInput> {
        self.inputs.iter().find(|i| i.node == node)
    }
}

/// Keys a tensor file may carry that are not inputs (fixture extras).
fn ignored(key: &str) -> bool {
    key == "loss" || key.starts_with("grad.") || key.starts_with("component.")
}

fn find<'t>(tensors: &'t TensorMap, name: &str) -> Option<(String, &'t HostTensor)> {
    for key in [format!("input.{name}"), name.to_string()] {
        if let Some(t) = tensors.get(&key) {
            return Some((key, t));
        }
    }
    None
}

/// Whether `key` names a column of the variadic input `name`: `name_3`,
/// `name3`, or either with the `input.` prefix.
fn is_column_of(key: &str, name: &str) -> bool {
    let bare = key.strip_prefix("input.").unwrap_or(key);
    let Some(rest) = bare.strip_prefix(name) else {
        return false;
    };
    let n = rest.strip_prefix('_').unwrap_or(rest);
    !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
}

/// Binds the tensors of a file (or of random generation) to the inputs.
pub fn bind(graph: &Graph, tensors: &TensorMap) -> Result<Bound, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let mut used: Vec<String> = Vec::new();
    let mut raw: Vec<(
        NodeId,
        String,
        Vec<String>,
        HostTensor,
        DType,
        Vec<Dim>,
        bool,
    )> = Vec::new();
    // Keys that held a whole stacked [K, ...] tensor for a variadic input.
    let mut stacked_keys: Vec<String> = Vec::new();
    // Dims of inputs that could not be bound: calling them "not fixed by any
    // input" would only repeat the error already reported for the input.
    let mut unbound: Vec<String> = Vec::new();
    for (id, node, name, variadic) in graph.inputs() {
        let gathered = if variadic {
            gather_columns(tensors, name, node.shape.len())
        } else {
            find(tensors, name).map(|(k, t)| Ok((vec![k], t.clone())))
        };
        match gathered {
            Some(Ok((keys, t))) => {
                if variadic
                    && keys.len() == 1
                    && tensors
                        .get(&keys[0])
                        .is_some_and(|orig| orig.shape.len() == node.shape.len())
                {
                    stacked_keys.push(keys[0].clone());
                }
                used.extend(keys.iter().cloned());
                raw.push((
                    id,
                    name.to_string(),
                    keys,
                    t,
                    node.dtype,
                    node.shape.clone(),
                    variadic,
                ));
            }
            Some(Err(d)) => {
                // Misnumbered columns still belong to this input; they are
                // not also unexpected tensors.
                used.extend(tensors.keys().filter(|k| is_column_of(k, name)).cloned());
                unbound.extend(node.shape.iter().flat_map(|d| d.symbols()));
                diags.push(d)
            }
            None if variadic => {
                let mut shape = vec![0usize];
                shape.extend(std::iter::repeat_n(0usize, node.shape.len() - 1));
                raw.push((
                    id,
                    name.to_string(),
                    vec![],
                    match node.dtype {
                        DType::Float => HostTensor::f64(shape, vec![]),
                        DType::Int => HostTensor::i64(shape, vec![]),
                        DType::Bool => HostTensor::bool(shape, vec![]),
                    },
                    node.dtype,
                    node.shape.clone(),
                    true,
                ));
            }
            None => diags.push({
                unbound.extend(node.shape.iter().flat_map(|d| d.symbols()));
                Diagnostic::error(
                    codes::MISSING_TENSOR,
                    format!(
                        "missing input `{name}`: expected a {} tensor of shape {}",
                        node.dtype.name(),
                        shape_string(&node.shape)
                    ),
                )
                .with_help(format!("give it under the key `{name}` or `input.{name}`"))
            }),
        }
    }
    let input_names: Vec<&str> = graph.inputs().map(|i| i.2).collect();
    for key in tensors.keys() {
        if !ignored(key) && !used.contains(key) {
            diags.push(
                Diagnostic::error(
                    codes::EXTRA_TENSOR,
                    format!(
                        "unexpected tensor `{key}`: `{}` has no such input",
                        graph.name
                    ),
                )
                .with_help(format!("its inputs are: {}", input_names.join(", "))),
            );
        }
    }
    let mut inputs = Vec::new();
    for (node, name, columns, tensor, dtype, _, variadic) in &raw {
        match convert(name, tensor, *dtype) {
            Ok(t) => {
                let split_columns = *variadic
                    && !stacked_keys.contains(&columns.first().cloned().unwrap_or_default());
                inputs.push(BoundInput {
                    node: *node,
                    name: name.clone(),
                    columns: columns.clone(),
                    tensor: t,
                    split_columns,
                })
            }
            Err(d) => diags.push(d),
        }
    }
    let sizes = match solve_sizes(graph, &raw, &unbound) {
        Ok(s) => s,
        Err(mut d) => {
            diags.append(&mut d);
            BTreeMap::new()
        }
    };
    // An absent column input is an empty tensor of the right trailing shape.
    for (input, (_, _, columns, _, _, shape, variadic)) in inputs.iter_mut().zip(raw.iter()) {
        if *variadic && columns.is_empty() {
            let dims: Vec<usize> = std::iter::once(0)
                .chain(
                    shape[1..]
                        .iter()
                        .map(|d| d.eval(&sizes).unwrap_or(0).max(0) as usize),
                )
                .collect();
            input.tensor = HostTensor {
                shape: dims,
                data: input.tensor.data.clone(),
            };
        }
    }
    if diags.is_empty() {
        Ok(Bound { sizes, inputs })
    } else {
        Err(diags)
    }
}

/// A variadic input from `name` (stacked, or one column) or `name_1..name_n`.
fn gather_columns(
    tensors: &TensorMap,
    name: &str,
    rank: usize,
) -> Option<Result<(Vec<String>, HostTensor), Diagnostic>> {
    if let Some((key, t)) = find(tensors, name) {
        if t.shape.len() + 1 == rank {
            let mut shape = vec![1];
            shape.extend(&t.shape);
            return Some(Ok((
                vec![key],
                HostTensor {
                    shape,
                    data: t.data.clone(),
                },
            )));
        }
        return Some(Ok((vec![key], t.clone())));
    }
    // Columns are `name_1, name_2, ...` or, as sentence-transformers names
    // student columns, `name1, name2, ...`.
    let mut cols = Vec::new();
    let mut sep = "_";
    for candidate in ["_", ""] {
        cols = (1..)
            .map_while(|n| find(tensors, &format!("{name}{candidate}{n}")))
            .collect();
        if !cols.is_empty() {
            sep = candidate;
            break;
        }
    }
    let stray = tensors.keys().find(|k| {
        let bare = k.strip_prefix("input.").unwrap_or(k);
        bare.strip_prefix(&format!("{name}{sep}"))
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n > cols.len())
    });
    if let Some(k) = stray {
        return Some(Err(Diagnostic::error(codes::MISSING_TENSOR, format!("column `{k}` found, but the columns of `{name}` must be numbered {name}{sep}1, {name}{sep}2, ... without gaps"))
            .with_help(format!("found {} consecutive columns before the gap", cols.len()))));
    }
    if cols.is_empty() {
        return None;
    }
    let first_shape = cols[0].1.shape.clone();
    for (k, t) in &cols {
        if t.shape != first_shape || t.dtype_name() != cols[0].1.dtype_name() {
            return Some(Err(Diagnostic::error(
                codes::TENSOR_SHAPE,
                format!(
                    "the columns of `{name}` differ: `{}` is {} {:?}, `{k}` is {} {:?}",
                    cols[0].0,
                    cols[0].1.dtype_name(),
                    first_shape,
                    t.dtype_name(),
                    t.shape
                ),
            )));
        }
    }
    let mut shape = vec![cols.len()];
    shape.extend(&first_shape);
    let data = match &cols[0].1.data {
        TensorData::I64(_) => TensorData::I64(
            cols.iter()
                .flat_map(|(_, t)| t.to_f64_vec().into_iter().map(|x| x as i64))
                .collect(),
        ),
        _ => TensorData::F64(cols.iter().flat_map(|(_, t)| t.to_f64_vec()).collect()),
    };
    Some(Ok((
        cols.iter().map(|c| c.0.clone()).collect(),
        HostTensor { shape, data },
    )))
}

/// Checks the dtype and converts to the representation backends read.
fn convert(name: &str, t: &HostTensor, want: DType) -> Result<HostTensor, Diagnostic> {
    let wrong = || {
        Diagnostic::error(
            codes::TENSOR_DTYPE,
            format!(
                "input `{name}` must be {}, the file has {}",
                want.name(),
                t.dtype_name()
            ),
        )
        .with_help(match want {
            DType::Float => "float inputs accept f64, f32 and int tensors",
            DType::Int => {
                "int inputs (labels, token ids) accept i64/i32 tensors; store them as integers"
            }
            DType::Bool => "bool inputs accept bool tensors",
        })
    };
    let shape = t.shape.clone();
    match (want, &t.data) {
        (DType::Float, TensorData::F64(_) | TensorData::F32(_) | TensorData::I64(_)) => {
            if let Some(at) = t.first_non_finite() {
                let idx = unravel(at, &shape);
                let value = t.to_f64_vec()[at];
                return Err(Diagnostic::error(codes::NON_FINITE, format!("input `{name}` has a non-finite value ({value}) at {idx:?}"))
                    .with_help("lossc evaluates losses on finite inputs only; check the producer of this tensor"));
            }
            Ok(HostTensor::f64(shape, t.to_f64_vec()))
        }
        (DType::Int, TensorData::I64(v)) => Ok(HostTensor::i64(shape, v.clone())),
        (DType::Bool, TensorData::Bool(v)) => Ok(HostTensor::bool(shape, v.clone())),
        _ => Err(wrong()),
    }
}

fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (k, d) in shape.iter().enumerate().rev() {
        if *d > 0 {
            idx[k] = flat % d;
            flat /= d;
        }
    }
    idx
}

type Raw = (
    NodeId,
    String,
    Vec<String>,
    HostTensor,
    DType,
    Vec<Dim>,
    bool,
);

/// Solves the symbolic dims from the inputs' shapes, then checks every dim.
fn solve_sizes(
    graph: &Graph,
    raw: &[Raw],
    unbound: &[String],
) -> Result<BTreeMap<String, i64>, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let mut sizes: BTreeMap<String, i64> = BTreeMap::new();
    let mut origin: BTreeMap<String, String> = BTreeMap::new();
    for (_, name, _, t, _, shape, _) in raw {
        if t.shape.len() != shape.len() {
            diags.push(
                Diagnostic::error(
                    codes::TENSOR_SHAPE,
                    format!(
                        "input `{name}` has rank {} (shape {:?}), expected rank {} ({})",
                        t.shape.len(),
                        t.shape,
                        shape.len(),
                        shape_string(shape)
                    ),
                )
                .with_help("every input's rank is fixed by its declaration"),
            );
        }
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    // Repeatedly solve dims with one unknown symbol until nothing changes.
    loop {
        let mut changed = false;
        for (_, name, columns, t, _, shape, variadic) in raw {
            // An absent column input says only that it has no columns.
            if *variadic && columns.is_empty() {
                if let Some(k) = shape.first().and_then(|d| d.as_sym()) {
                    changed |= !sizes.contains_key(k);
                    sizes.entry(k.to_string()).or_insert(0);
                }
                continue;
            }
            for (d, n) in shape.iter().zip(&t.shape) {
                if d.eval(&sizes).is_none() {
                    if let Some((sym, v)) = d.solve(*n as i64, &sizes) {
                        sizes.insert(sym.clone(), v);
                        origin.insert(sym, name.clone());
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for (_, name, _, t, _, shape, variadic) in raw {
        // An absent variadic input fixes its column count to 0 and nothing else.
        if *variadic && t.len() == 0 && t.shape.iter().skip(1).all(|d| *d == 0) {
            if let Some(k) = shape[0].as_sym() {
                sizes.entry(k.to_string()).or_insert(0);
            }
            continue;
        }
        let expected: Vec<Option<i64>> = shape.iter().map(|d| d.eval(&sizes)).collect();
        if expected
            .iter()
            .zip(&t.shape)
            .any(|(e, n)| e.is_some_and(|e| e != *n as i64) || e.is_none())
        {
            let explain: Vec<String> = shape
                .iter()
                .flat_map(|d| d.symbols())
                .filter_map(|s| {
                    sizes.get(&s).map(|v| {
                        format!(
                            "{s} = {v}{}",
                            origin
                                .get(&s)
                                .map_or(String::new(), |o| format!(" (from `{o}`)"))
                        )
                    })
                })
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            // Spell out the concrete shape when every dim is known: the
            // symbolic one alone leaves the reader to do the arithmetic.
            let concrete: Option<Vec<i64>> = expected.iter().copied().collect();
            let want = match concrete {
                Some(c) if shape.iter().any(|d| !d.symbols().is_empty()) => {
                    format!("{} = {c:?}", shape_string(shape))
                }
                _ => shape_string(shape),
            };
            diags.push(
                Diagnostic::error(
                    codes::TENSOR_SHAPE,
                    format!("input `{name}` has shape {:?}, expected {want}", t.shape),
                )
                .with_help(if explain.is_empty() {
                    "check the tensor's shape".to_string()
                } else {
                    format!("with {}", explain.join(", "))
                }),
            );
        }
    }
    // Dims used by the program but fixed by no input.
    for node in &graph.nodes {
        for d in &node.shape {
            for s in d.symbols() {
                if !sizes.contains_key(&s)
                    && !unbound.contains(&s)
                    && !diags
                        .iter()
                        .any(|x| x.message.contains(&format!("dim `{s}`")))
                {
                    diags.push(
                        Diagnostic::error(
                            codes::TENSOR_SHAPE,
                            format!("the dim `{s}` is not fixed by any input"),
                        )
                        .with_help(
                            "declare an input that uses it, or annotate with a literal size",
                        ),
                    );
                }
            }
        }
    }
    if diags.is_empty() {
        Ok(sizes)
    } else {
        Err(diags)
    }
}

/// The most elements one random input may have (2^28: 2 GiB of f64).
pub const MAX_RANDOM_ELEMENTS: usize = 1 << 28;

/// Seeded random inputs for a graph: normal floats, small non-negative ints,
/// bools; dims from `dims` or small defaults (B = 8, D = 16, K = 1, others 4).
pub fn random_inputs(
    graph: &Graph,
    seed: u64,
    dims: &BTreeMap<String, i64>,
) -> Result<TensorMap, Diagnostic> {
    let mut sizes = dims.clone();
    for s in graph.dim_names() {
        let default = match s.as_str() {
            "B" => 8,
            "D" => 16,
            "K" => 1,
            _ => 4,
        };
        sizes.entry(s).or_insert(default);
    }
    let mut rng = SplitMix64(seed);
    let mut out = TensorMap::new();
    for (_, node, name, _) in graph.inputs() {
        let mut shape = Vec::new();
        for d in &node.shape {
            let v = d.eval(&sizes).ok_or_else(|| {
                let why = if d.symbols().iter().all(|s| sizes.contains_key(s)) {
                    "does not fit in 64 bits"
                } else {
                    "is unknown"
                };
                Diagnostic::error(
                    codes::TENSOR_SHAPE,
                    format!("cannot size input `{name}`: {d} {why}"),
                )
            })?;
            if v < 0 {
                return Err(Diagnostic::error(
                    codes::TENSOR_SHAPE,
                    format!("input `{name}` would have a negative dim ({d} = {v})"),
                ));
            }
            shape.push(v as usize);
        }
        // The dims come from the command line: refuse sizes whose element
        // count overflows or that no machine could hold, instead of panicking.
        let n = crate::tensor_io::element_count(&shape)
            .filter(|n| *n <= MAX_RANDOM_ELEMENTS)
            .ok_or_else(|| {
                Diagnostic::error(
                    codes::TENSOR_SHAPE,
                    format!(
                        "random input `{name}` of shape {} = {shape:?} is too large \
                         (at most {MAX_RANDOM_ELEMENTS} elements)",
                        shape_string(&node.shape)
                    ),
                )
                .with_help("choose smaller dims, or give real tensors with --inputs")
            })?;
        let t = match node.dtype {
            DType::Float if name.contains("label") || name.contains("score") => {
                HostTensor::f64(shape, (0..n).map(|_| rng.uniform()).collect())
            }
            DType::Float => HostTensor::f64(shape, (0..n).map(|_| rng.normal()).collect()),
            DType::Int => HostTensor::i64(shape, (0..n).map(|_| (rng.next() % 3) as i64).collect()),
            DType::Bool => HostTensor::bool(shape, (0..n).map(|_| rng.next() % 2 == 0).collect()),
        };
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

/// A small, stable generator: the same seed gives the same inputs on every
/// platform and lossc version (no dependency whose stream may change).
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}
