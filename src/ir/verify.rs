//! The IR verifier: the structural invariants every pass must keep.
//!
//! It checks SSA order (reads name earlier nodes), read arity, bound index
//! variables, expression typing, layout-node shapes and outputs. It reports
//! the first broken invariant as a message naming the node; a failure is a
//! bug in lossc, never in the user's program.

use super::*;

pub fn verify(graph: &Graph) -> Result<(), String> {
    for (i, node) in graph.nodes.iter().enumerate() {
        let id = NodeId(i as u32);
        verify_node(graph, id, node)
            .map_err(|e| format!("%{i}: {e}\n  {}", print::print_node(graph, id, node)))?;
    }
    if graph.outputs.is_empty() {
        return Err("graph has no outputs".into());
    }
    for (name, id) in &graph.outputs {
        let node = graph
            .nodes
            .get(id.index())
            .ok_or_else(|| format!("output {name} names a missing node"))?;
        if !node.shape.is_empty() || node.dtype != DType::Float {
            return Err(format!("output {name} must be a float scalar"));
        }
    }
    for (name, id) in &graph.grads {
        let node = graph
            .nodes
            .get(id.index())
            .ok_or_else(|| format!("grad {name} names a missing node"))?;
        let input = graph
            .inputs()
            .find(|i| i.2 == name)
            .ok_or_else(|| format!("grad {name} names no input"))?;
        if node.shape != input.1.shape || node.dtype != DType::Float {
            return Err(format!(
                "grad {name} must be a float tensor of the input's shape"
            ));
        }
    }
    Ok(())
}

fn verify_node(graph: &Graph, id: NodeId, node: &Node) -> Result<(), String> {
    for op in graph.operands(id) {
        if op >= id {
            return Err(format!("reads %{} which is not earlier", op.0));
        }
    }
    match &node.kind {
        NodeKind::Input { .. } => Ok(()),
        NodeKind::Comp(c) => verify_comp(graph, node, c),
        NodeKind::Concat { axis, parts } => {
            if parts.is_empty() || *axis >= node.shape.len() {
                return Err("concat needs parts and an axis inside the shape".into());
            }
            let mut total = Dim::lit(0);
            for p in parts {
                let ps = &graph.node(*p).shape;
                if ps.len() != node.shape.len() {
                    return Err(format!("concat part %{} has rank {}", p.0, ps.len()));
                }
                for (a, (d1, d2)) in ps.iter().zip(&node.shape).enumerate() {
                    if a != *axis && d1 != d2 {
                        return Err(format!(
                            "concat part %{} has dim {a} = {d1}, expected {d2}",
                            p.0
                        ));
                    }
                }
                total = total.add(&ps[*axis]);
                if graph.node(*p).dtype != node.dtype {
                    return Err("concat parts differ in dtype".into());
                }
            }
            if total != node.shape[*axis] {
                return Err(format!(
                    "concat dim {} is {}, parts sum to {total}",
                    axis, node.shape[*axis]
                ));
            }
            Ok(())
        }
        NodeKind::Slice { src, axis, .. } => {
            let s = &graph.node(*src).shape;
            if s.len() != node.shape.len() || *axis >= s.len() {
                return Err("slice changes rank or has a bad axis".into());
            }
            Ok(())
        }
        NodeKind::Reshape { src } => {
            let s = &graph.node(*src).shape;
            let prod = |sh: &[Dim]| sh.iter().fold(Dim::lit(1), |a, d| a.mul(d));
            if prod(s) != prod(&node.shape) {
                return Err(format!(
                    "reshape changes the element count: {} vs {}",
                    prod(s),
                    prod(&node.shape)
                ));
            }
            Ok(())
        }
    }
}

fn verify_comp(graph: &Graph, node: &Node, c: &Comp) -> Result<(), String> {
    if c.indices.len() != node.shape.len() {
        return Err(format!(
            "{} indices for a rank-{} node",
            c.indices.len(),
            node.shape.len()
        ));
    }
    let mut bound: Vec<IdxVar> = c.indices.clone();
    if let Some(r) = &c.reduce {
        bound.extend(r.over.iter().map(|(v, _)| *v));
        if let Some(f) = &r.filter {
            check_expr(graph, f, &bound)?;
            if f.dtype(graph) != DType::Bool {
                return Err("filter is not a bool".into());
            }
        }
    }
    check_expr(graph, &c.body, &bound)?;
    let body_ty = c.body.dtype(graph);
    let expect = match c.reduce.as_ref().map(|r| r.op) {
        None | Some(RedOp::Sum) | Some(RedOp::Max) | Some(RedOp::Min) => body_ty,
        Some(RedOp::Mean) | Some(RedOp::LogSumExp) => DType::Float,
        Some(RedOp::Count) => DType::Int,
        Some(RedOp::Any) | Some(RedOp::All) => DType::Bool,
    };
    if expect != node.dtype {
        return Err(format!(
            "node dtype {} but body gives {}",
            node.dtype.name(),
            expect.name()
        ));
    }
    Ok(())
}

fn check_expr(graph: &Graph, e: &Expr, bound: &[IdxVar]) -> Result<(), String> {
    let mut err = None;
    e.walk(&mut |x| {
        if err.is_some() {
            return;
        }
        err = check_one(graph, x, bound).err();
    });
    err.map_or(Ok(()), Err)
}

fn check_one(graph: &Graph, e: &Expr, bound: &[IdxVar]) -> Result<(), String> {
    match e {
        Expr::Index(v) if !bound.contains(v) => Err(format!(
            "index `{}` is not bound here",
            graph.index_name(*v)
        )),
        Expr::Read { node, at } => {
            let target = graph
                .nodes
                .get(node.index())
                .ok_or_else(|| format!("read of missing node %{}", node.0))?;
            if at.len() != target.shape.len() {
                return Err(format!(
                    "read of %{} with {} indices, it has rank {}",
                    node.0,
                    at.len(),
                    target.shape.len()
                ));
            }
            if at.iter().any(|a| a.dtype(graph) != DType::Int) {
                return Err(format!("read of %{} at a non-int index", node.0));
            }
            Ok(())
        }
        Expr::Unary(op, a) => {
            let t = a.dtype(graph);
            let ok = match op {
                UnOp::Not => t == DType::Bool,
                UnOp::ToFloat => true,
                UnOp::Neg | UnOp::Abs => t != DType::Bool,
                _ => t == DType::Float,
            };
            if ok {
                Ok(())
            } else {
                Err(format!("{} applied to a {}", op.name(), t.name()))
            }
        }
        Expr::Binary(op, a, b) => {
            let (ta, tb) = (a.dtype(graph), b.dtype(graph));
            let ok = if op.is_logical() {
                ta == DType::Bool && tb == DType::Bool
            } else if matches!(op, BinOp::Eq | BinOp::Ne) {
                ta == tb
            } else if matches!(op, BinOp::Rem | BinOp::FloorDiv) {
                ta == DType::Int && tb == DType::Int
            } else {
                ta == tb && ta != DType::Bool
            };
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "`{}` applied to {} and {}",
                    op.symbol(),
                    ta.name(),
                    tb.name()
                ))
            }
        }
        Expr::Select(c, a, b) => {
            if c.dtype(graph) != DType::Bool || a.dtype(graph) != b.dtype(graph) {
                Err("select needs a bool condition and branches of one type".into())
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}
