//! pest → AST. The grammar (`grammar/loss.pest`) is the single source of the
//! syntax; this file only walks the pairs pest produces.
//!
//! Parsing never panics on user text: a pest error becomes one `LC0001`
//! diagnostic at the failing position, naming what was expected in words.
//! A successful parse of a file that declares nothing is `LC0002`.

use super::ast::*;
use super::codes;
use super::diag::Diagnostic;
use super::source::{FileId, Span};
use pest::iterators::Pair;
use pest::Parser;
use pest_derive::Parser;

#[derive(Parser)]
#[grammar = "../grammar/loss.pest"]
struct LossParser;

type P<'i> = Pair<'i, Rule>;

/// Parses one file. On error, returns the diagnostics (today: one).
pub fn parse_file(file: FileId, text: &str) -> Result<File, Vec<Diagnostic>> {
    let pairs =
        LossParser::parse(Rule::file, text).map_err(|e| vec![syntax_error(file, text, e)])?;
    let cx = Cx { file, text };
    let mut items = Vec::new();
    for pair in pairs.flatten().take(1) {
        for item in pair.into_inner() {
            match item.as_rule() {
                Rule::use_decl => items.push(Item::Use(cx.use_decl(item))),
                Rule::fn_decl => items.push(Item::Fn(cx.fn_decl(item))),
                Rule::loss_decl => items.push(Item::Loss(cx.loss_decl(item))),
                _ => {}
            }
        }
    }
    if items.is_empty() {
        let end = text.len();
        return Err(vec![Diagnostic::error(codes::EMPTY_FILE, "this file declares nothing")
            .at(Span::new(file, 0, end.min(1)), "expected a `loss`, `fn` or `use` declaration")
            .with_help("a .loss file holds `loss Name(params) { ... }` declarations, e.g.\n  loss Mse() { input x: [N]  mean(i) x[i]^2 }")]);
    }
    Ok(File { items })
}

fn syntax_error(file: FileId, text: &str, e: pest::error::Error<Rule>) -> Diagnostic {
    let (start, end) = match e.location {
        pest::error::InputLocation::Pos(p) => (p, p),
        pest::error::InputLocation::Span((s, e)) => (s, e),
    };
    // Point at the offending token (or the end of input) rather than at nothing.
    let tok_end = text[start..]
        .char_indices()
        .find(|(_, c)| c.is_whitespace())
        .map_or(text.len(), |(i, _)| start + i)
        .max(end)
        .max((start + 1).min(text.len()));
    let found = match text[start..tok_end].trim() {
        "" if start >= text.len() => "end of file".to_string(),
        "" => "whitespace".to_string(),
        t => format!("`{}`", t.chars().take(24).collect::<String>()),
    };
    let positives: &[Rule] = match &e.variant {
        pest::error::ErrorVariant::ParsingError { positives, .. } => positives,
        pest::error::ErrorVariant::CustomError { .. } => &[],
    };
    if let Some(r) = relocate(text, start, positives) {
        let mut d = Diagnostic::error(codes::SYNTAX, r.message)
            .at(Span::new(file, r.start, r.end), r.label);
        if let Some(help) = r.help {
            d = d.with_help(help);
        }
        return d;
    }
    let expected = match &e.variant {
        pest::error::ErrorVariant::ParsingError { positives, .. } => describe_expected(positives),
        pest::error::ErrorVariant::CustomError { message } => message.clone(),
    };
    let mut d = Diagnostic::error(codes::SYNTAX, format!("syntax error: unexpected {found}")).at(
        Span::new(file, start, tok_end),
        format!("expected {expected}"),
    );
    if let Some(help) = syntax_help(text, start, positives) {
        d = d.with_help(help);
    }
    d
}

/// A syntax error told where its cause is, when that is not where pest
/// stopped: pest fails at the first token it cannot use, which for an
/// unclosed bracket, a line that runs into the next one, or `f (x)` is
/// often a line or more after the mistake.
struct Relocated {
    start: usize,
    end: usize,
    message: String,
    label: String,
    help: Option<String>,
}

const REDUCTIONS: &[&str] = &[
    "sum",
    "mean",
    "max",
    "min",
    "logsumexp",
    "any",
    "all",
    "count",
];

const KEYWORDS: &[&str] = &[
    "loss",
    "fn",
    "let",
    "input",
    "output",
    "use",
    "require",
    "if",
    "then",
    "else",
    "and",
    "or",
    "not",
    "match",
    "in",
    "sum",
    "mean",
    "max",
    "min",
    "logsumexp",
    "count",
    "any",
    "all",
    "true",
    "false",
    "null",
];

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The text with comments and string contents blanked out (byte for byte,
/// so offsets are kept), for scanning brackets and tokens.
fn code_only(text: &str) -> Vec<u8> {
    let mut out = text.as_bytes().to_vec();
    let mut in_comment = false;
    let mut in_string = false;
    for b in out.iter_mut() {
        match *b {
            b'\n' => {
                in_comment = false;
                in_string = false;
            }
            b'"' if !in_comment => in_string = !in_string,
            b'#' if !in_string => {
                in_comment = true;
                *b = b' ';
            }
            _ if in_comment || in_string => *b = b' ',
            _ => {}
        }
    }
    out
}

/// The word (identifier or keyword) that ends at `end` in `code`, if any.
fn word_before(code: &[u8], end: usize) -> Option<(usize, &str)> {
    let mut start = end;
    while start > 0 && is_ident_byte(code[start - 1]) {
        start -= 1;
    }
    if start == end || code[start].is_ascii_digit() {
        return None;
    }
    std::str::from_utf8(&code[start..end])
        .ok()
        .map(|w| (start, w))
}

fn relocate(text: &str, pos: usize, positives: &[Rule]) -> Option<Relocated> {
    let code = code_only(text);
    let pos = pos.min(code.len());
    let line_end = |from: usize| text[from..].find('\n').map_or(text.len(), |i| from + i);

    // An unterminated string: pest expected a string and found a `"`.
    if text[pos..].starts_with('"') && !text[pos + 1..line_end(pos)].contains('"') {
        return Some(Relocated {
            start: pos,
            end: line_end(pos),
            message: "syntax error: this string is not closed".into(),
            label: "no closing `\"` on this line".into(),
            help: Some("a string ends with `\"` on the line where it starts".into()),
        });
    }

    // Brackets still open where the parse failed.
    let mut open: Vec<(u8, usize)> = Vec::new();
    for (i, b) in code[..pos].iter().enumerate() {
        match b {
            b'(' | b'[' | b'{' => open.push((*b, i)),
            b')' | b']' | b'}' => {
                open.pop();
            }
            _ => {}
        }
    }
    let rest = text[pos..].trim_start();
    let closer = |b: u8| match b {
        b'(' => ')',
        b'[' => ']',
        _ => '}',
    };
    if let Some(&(b, at)) = open.last() {
        let unclosed = rest.is_empty() || (rest.starts_with('}') && b != b'{');
        if unclosed {
            let end_of = if rest.is_empty() {
                "the file ends"
            } else {
                "the block ends"
            };
            return Some(Relocated {
                start: at,
                end: at + 1,
                message: format!("syntax error: this `{}` is never closed", b as char),
                label: format!("{end_of} before its `{}`", closer(b)),
                help: None,
            });
        }
    }

    // A block without a result, because its last line was swallowed by the
    // line before: a trailing operator, or a reduction head such as
    // `max(a, b)` whose body is taken from the next line.
    if let (Some(&(b'{', open_at)), true) = (open.last(), rest.starts_with('}')) {
        let mut lines: Vec<(usize, usize)> = Vec::new();
        let mut line_start = open_at + 1;
        for i in open_at + 1..=pos {
            if i == pos || code[i] == b'\n' {
                if code[line_start..i].iter().any(|c| !c.is_ascii_whitespace()) {
                    lines.push((line_start, i));
                }
                line_start = i + 1;
            }
        }
        let no_result_help = "a block ends with the expression it computes (the loss value)";
        if lines.len() >= 2 {
            let (ls, le) = lines[lines.len() - 2];
            let mut end = le;
            while end > ls && code[end - 1].is_ascii_whitespace() {
                end -= 1;
            }
            let line = &code[ls..end];
            const OPS: &[&str] = &[
                "==", "!=", "<=", ">=", "=>", "+", "-", "*", "/", "%", "^", "<", ">", "=", "|",
            ];
            let word_op = word_before(&code, end)
                .filter(|(_, w)| ["and", "or", "not", "then", "else", "in"].contains(w));
            let op = OPS
                .iter()
                .find(|op| line.ends_with(op.as_bytes()))
                .map(|op| (end - op.len(), op.to_string()))
                .or(word_op.map(|(s, w)| (s, w.to_string())));
            if let Some((at, op)) = op {
                return Some(Relocated {
                    start: at,
                    end,
                    message: "syntax error: this block has no result".into(),
                    label: format!("this `{op}` continues the expression onto the next line"),
                    help: Some(format!("the next line was read as the operand of `{op}`, so no expression is left to be the block's result; {no_result_help}")),
                });
            }
            if line.ends_with(b")") {
                let mut depth = 0i32;
                let mut open_paren = None;
                for i in (ls..end).rev() {
                    match code[i] {
                        b')' => depth += 1,
                        b'(' => {
                            depth -= 1;
                            if depth == 0 {
                                open_paren = Some(i);
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                if let Some((ws, kw)) = open_paren.and_then(|p| word_before(&code, p)) {
                    if REDUCTIONS.contains(&kw) {
                        return Some(Relocated {
                            start: ws,
                            end,
                            message: "syntax error: this block has no result".into(),
                            label: format!(
                                "a reduction: `{kw}(...)` takes the next line as its body"
                            ),
                            help: Some(reduction_help(kw)),
                        });
                    }
                }
            }
        }
        // The parser stood between statements, wanting the result.
        let at_statement = positives.iter().any(|r| {
            matches!(
                r,
                Rule::let_stmt | Rule::input_stmt | Rule::output_stmt | Rule::require_stmt
            )
        });
        if at_statement {
            return Some(Relocated {
                start: pos,
                end: pos + 1,
                message: "syntax error: this block has no result".into(),
                label: "expected the expression the block computes before `}`".into(),
                help: Some(no_result_help.into()),
            });
        }
    }

    // `f (x)`: a space between a name and `(` makes two expressions, and the
    // parse fails a little later. Look on this line and the one before.
    let line_start = |at: usize| text[..at].rfind('\n').map_or(0, |i| i + 1);
    let here = line_start(pos);
    let from = if here > 0 { line_start(here - 1) } else { 0 };
    let mut found = None;
    for i in from..pos {
        if code[i] != b'(' {
            continue;
        }
        let mut j = i;
        while j > from && (code[j - 1] == b' ' || code[j - 1] == b'\t') {
            j -= 1;
        }
        if j == i {
            continue;
        }
        if let Some((ws, w)) = word_before(&code, j) {
            let after_decl = word_before(&code, ws.saturating_sub(1))
                .is_some_and(|(_, p)| p == "fn" || p == "loss");
            if !KEYWORDS.contains(&w) && !after_decl {
                found = Some((ws, i, w.to_string()));
            }
        }
    }
    if let Some((ws, paren, name)) = found {
        return Some(Relocated {
            start: ws,
            end: paren + 1,
            message: "syntax error: a call's `(` must touch the function name".into(),
            label: format!("read as `{name}` and then a separate `(...)`"),
            help: Some(format!("write `{name}(...)`, without the space")),
        });
    }

    // The file ends in the middle of something: point at its last token
    // (an empty span at the very end would show no source line).
    if rest.is_empty() {
        if let Some(last) = code[..pos].iter().rposition(|b| !b.is_ascii_whitespace()) {
            let expected = describe_expected(positives);
            // `last` is the final byte of a character; start at its first.
            let mut start = last;
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            return Some(Relocated {
                start,
                end: last + 1,
                message: "syntax error: unexpected end of file".into(),
                label: format!("the file ends after this; expected {expected}"),
                help: None,
            });
        }
    }
    None
}

fn reduction_help(kw: &str) -> String {
    format!(
        "`{kw}(...)` is a reduction over named indices, e.g. `{kw}(j) d[i, j]`; for the elementwise form of two values use `maximum(a, b)` / `minimum(a, b)`"
    )
}

fn describe_expected(rules: &[Rule]) -> String {
    let mut names: Vec<&str> = rules.iter().map(|r| rule_name(*r)).collect();
    names.sort();
    names.dedup();
    match names.len() {
        0 => "something else".into(),
        1 => names[0].into(),
        n => format!("{} or {}", names[..n - 1].join(", "), names[n - 1]),
    }
}

fn rule_name(rule: Rule) -> &'static str {
    match rule {
        Rule::ident => "a name",
        Rule::int | Rule::float => "a number",
        Rule::expr | Rule::or_expr | Rule::and_expr | Rule::not_expr | Rule::cmp_expr => {
            "an expression"
        }
        Rule::add_expr
        | Rule::mul_expr
        | Rule::unary
        | Rule::power
        | Rule::postfix
        | Rule::primary => "an expression",
        Rule::item | Rule::use_decl | Rule::fn_decl | Rule::loss_decl => {
            "a declaration (`loss`, `fn`, `use`)"
        }
        Rule::EOI => "end of file",
        Rule::param_ty | Rule::prim_ty | Rule::list_ty | Rule::enum_ty => {
            "a parameter type (float, int, bool, fn, loss, {a, b}, [T])"
        }
        Rule::tensor_ty => "a tensor type such as `[B, D]` or `int[B]`",
        Rule::dim_expr | Rule::dim_term => "a dimension (a name such as `B`, or a number)",
        Rule::block => "`{`",
        Rule::binder => "an index name",
        Rule::string => "a quoted string",
        Rule::cmp_op => "a comparison",
        Rule::add_op | Rule::mul_op | Rule::pow_op => "an operator",
        Rule::and_op | Rule::or_op => "`and`/`or`",
        Rule::red_filter => "`|` and a filter",
        Rule::red_default => "`, else` and a default",
        Rule::call_args => "`(`",
        Rule::index_args => "`[`",
        Rule::stmt | Rule::let_stmt | Rule::input_stmt | Rule::require_stmt | Rule::output_stmt => {
            "a statement"
        }
        Rule::loss_param | Rule::loss_params => "a parameter",
        Rule::fn_param | Rule::fn_params => "a parameter name",
        Rule::arg => "an argument",
        Rule::variadic => "`= []`",
        Rule::elem_ty => "an element type (float, int, bool)",
        _ => "a token",
    }
}

fn syntax_help(text: &str, pos: usize, positives: &[Rule]) -> Option<String> {
    let rest = text[pos..].trim_start();
    let before = text[..pos].trim_end();
    if rest.starts_with('(') && before.ends_with(|c: char| c.is_alphanumeric() || c == '_') {
        return Some("a call's `(` must touch the function name: write `f(x)`, not `f (x)`".into());
    }
    if rest.starts_with("=") && !rest.starts_with("==") && before.ends_with(']') {
        return None;
    }
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    if positives.contains(&Rule::ident) && KEYWORDS.contains(&word.as_str()) {
        return Some(format!(
            "`{word}` is a keyword and cannot be a name; choose another"
        ));
    }
    // Inside or right after a reduction's head on this line: `max(x[i], 0)`.
    let code = code_only(text);
    let line_start = text[..pos].rfind('\n').map_or(0, |i| i + 1);
    for kw in REDUCTIONS {
        if before.ends_with(kw) || rest.starts_with(&format!("{kw}(")) {
            return Some(reduction_help(kw));
        }
        let pat = format!("{kw}(");
        let line = &text[line_start..pos];
        if let Some(k) = line.rfind(&pat) {
            let at = line_start + k;
            let boundary = at == 0 || !is_ident_byte(code[at - 1]);
            let mut depth = 0i32;
            let mut closed_at = None;
            for (i, b) in code[at + kw.len()..pos].iter().enumerate() {
                match b {
                    b'(' => depth += 1,
                    b')' => {
                        depth -= 1;
                        if depth == 0 {
                            closed_at = Some(at + kw.len() + i);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            // Still in the head, or the head closed just before the error.
            let in_head = closed_at.is_none_or(|c| text[c + 1..pos].trim().is_empty());
            if boundary && in_head {
                return Some(reduction_help(kw));
            }
        }
    }
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    if line.starts_with("input") && !line.contains(':') {
        return Some("an input needs a type: `input x: [B, D]`, `input labels: int[B]`".into());
    }
    if rest.starts_with('}') {
        return Some("a block ends with the expression it computes (the loss value)".into());
    }
    None
}

struct Cx<'t> {
    file: FileId,
    text: &'t str,
}

impl Cx<'_> {
    fn span(&self, p: &P) -> Span {
        let s = p.as_span();
        Span::new(self.file, s.start(), s.end())
    }

    /// The span of a rule up to the end of its last inner token. A rule that
    /// ends in an optional part (`input x: [B] = []`) also takes the
    /// whitespace and comments pest skipped looking for it; diagnostics
    /// should not underline those.
    fn span_to_last(&self, p: &P) -> Span {
        let s = p.as_span();
        let end = p
            .clone()
            .into_inner()
            .map(|i| i.as_span().end())
            .max()
            .unwrap_or(s.end());
        Span::new(self.file, s.start(), end)
    }

    fn ident(&self, p: P) -> Ident {
        Ident {
            name: p.as_str().to_string(),
            span: self.span(&p),
        }
    }

    fn use_decl(&self, p: P) -> UseDecl {
        let span = self.span_to_last(&p);
        let s = p
            .into_inner()
            .next()
            .map(|s| self.string(s))
            .unwrap_or_default();
        UseDecl { path: s, span }
    }

    fn string(&self, p: P) -> String {
        p.into_inner()
            .next()
            .map(|i| i.as_str().to_string())
            .unwrap_or_default()
    }

    fn fn_decl(&self, p: P) -> FnDecl {
        let span = self.span(&p);
        let mut it = p.into_inner();
        let name = self.ident(it.next().expect("grammar: fn name"));
        let mut params = Vec::new();
        let mut body = None;
        for part in it {
            match part.as_rule() {
                Rule::fn_params => {
                    for fp in part.into_inner() {
                        let mut f = fp.into_inner();
                        let name = self.ident(f.next().expect("grammar: param name"));
                        let ty = f.next().map(|t| self.tensor_ty(t));
                        params.push(FnParam { name, ty });
                    }
                }
                Rule::fn_body => {
                    let inner = part.into_inner().next().expect("grammar: fn body");
                    body = Some(match inner.as_rule() {
                        Rule::block => self.block(inner),
                        _ => Block {
                            stmts: vec![],
                            result: self.expr(inner),
                        },
                    });
                }
                _ => {}
            }
        }
        FnDecl {
            name,
            params,
            body: body.expect("grammar: fn body"),
            span,
        }
    }

    fn loss_decl(&self, p: P) -> LossDecl {
        let span = self.span(&p);
        let doc = self.doc_comment(span.start as usize);
        let mut it = p.into_inner();
        let name = self.ident(it.next().expect("grammar: loss name"));
        let mut params = Vec::new();
        let mut body = None;
        for part in it {
            match part.as_rule() {
                Rule::loss_params => {
                    params = part.into_inner().map(|lp| self.loss_param(lp)).collect()
                }
                Rule::block => body = Some(self.block(part)),
                _ => {}
            }
        }
        LossDecl {
            name,
            params,
            body: body.expect("grammar: loss body"),
            doc,
            span,
        }
    }

    /// The consecutive `#` lines right above a declaration.
    fn doc_comment(&self, start: usize) -> String {
        let mut lines = Vec::new();
        for line in self.text[..start].lines().rev() {
            let t = line.trim();
            match t.strip_prefix('#') {
                Some(rest) => lines.push(rest.strip_prefix(' ').unwrap_or(rest).to_string()),
                // Blank lines and `use` lines may stand between a doc comment and its loss.
                None if lines.is_empty() && (t.is_empty() || t.starts_with("use ")) => continue,
                None => break,
            }
        }
        lines.reverse();
        lines.join("\n")
    }

    fn loss_param(&self, p: P) -> ParamDecl {
        let span = self.span_to_last(&p);
        let mut it = p.into_inner();
        let name = self.ident(it.next().expect("grammar: param name"));
        let ty = self.param_ty(it.next().expect("grammar: param type"));
        let default = it.next().map(|e| self.expr(e));
        ParamDecl {
            name,
            ty,
            default,
            span,
        }
    }

    fn param_ty(&self, p: P) -> ParamTy {
        let mut it = p.into_inner();
        let base = it.next().expect("grammar: type");
        let ty = match base.as_rule() {
            Rule::prim_ty => match base.as_str() {
                "float" => ParamTy::Float,
                "int" => ParamTy::Int,
                "bool" => ParamTy::Bool,
                "fn" => ParamTy::Fn,
                "loss" => ParamTy::Loss,
                _ => ParamTy::Str,
            },
            Rule::list_ty => ParamTy::List(Box::new(
                self.param_ty(base.into_inner().next().expect("grammar: list elem")),
            )),
            Rule::enum_ty => {
                ParamTy::Enum(base.into_inner().map(|i| i.as_str().to_string()).collect())
            }
            _ => ParamTy::Str,
        };
        if it.next().is_some() {
            ParamTy::Optional(Box::new(ty))
        } else {
            ty
        }
    }

    fn block(&self, p: P) -> Block {
        let mut stmts = Vec::new();
        let mut result = None;
        for part in p.into_inner() {
            match part.as_rule() {
                Rule::input_stmt => stmts.push(Stmt::Input(self.input(part))),
                Rule::inputs_of => {
                    let span = self.span(&part);
                    let mut it = part.into_inner();
                    let loss = self.ident(it.next().expect("grammar: inputs_of loss"));
                    let per_layer = it
                        .next()
                        .and_then(|p| p.into_inner().next())
                        .map(|d| self.dim_expr(d));
                    stmts.push(Stmt::InputsOf {
                        loss,
                        per_layer,
                        span,
                    });
                }
                Rule::output_stmt => {
                    let mut it = part.into_inner();
                    let name = self.ident(it.next().expect("grammar: output name"));
                    let value = self.expr(it.next().expect("grammar: output value"));
                    stmts.push(Stmt::Output { name, value });
                }
                Rule::let_stmt => stmts.push(Stmt::Let(self.let_decl(part))),
                Rule::require_stmt => {
                    let span = self.span(&part);
                    let mut it = part.into_inner();
                    let cond = self.expr(it.next().expect("grammar: require cond"));
                    let message = self.string(it.next().expect("grammar: require message"));
                    stmts.push(Stmt::Require {
                        cond,
                        message,
                        span,
                    });
                }
                Rule::expr => result = Some(self.expr(part)),
                _ => {}
            }
        }
        Block {
            stmts,
            result: result.expect("grammar: block result"),
        }
    }

    fn input(&self, p: P) -> InputDecl {
        let span = self.span_to_last(&p);
        let mut it = p.into_inner();
        let name = self.ident(it.next().expect("grammar: input name"));
        let mut decl = InputDecl {
            name,
            types: Vec::new(),
            variadic: false,
            optional: false,
            span,
        };
        for part in it {
            match part.as_rule() {
                Rule::tensor_ty => decl.types.push(self.tensor_ty(part)),
                Rule::variadic => decl.variadic = true,
                _ => decl.optional = true,
            }
        }
        decl
    }

    fn tensor_ty(&self, p: P) -> TensorTy {
        let span = self.span(&p);
        let mut elem = ElemTy::Float;
        let mut dims = Vec::new();
        for part in p.into_inner() {
            match part.as_rule() {
                Rule::elem_ty => {
                    elem = match part.as_str() {
                        "int" => ElemTy::Int,
                        "bool" => ElemTy::Bool,
                        _ => ElemTy::Float,
                    }
                }
                Rule::dim_expr => dims.push(self.dim_expr(part)),
                _ => {}
            }
        }
        TensorTy { elem, dims, span }
    }

    fn dim_expr(&self, p: P) -> DimExpr {
        let mut it = p.into_inner();
        let mut acc = self.dim_term(it.next().expect("grammar: dim term"));
        while let (Some(op), Some(rhs)) = (it.next(), it.next()) {
            let rhs = self.dim_term(rhs);
            acc = if op.as_str() == "+" {
                DimExpr::Add(Box::new(acc), Box::new(rhs))
            } else {
                DimExpr::Sub(Box::new(acc), Box::new(rhs))
            };
        }
        acc
    }

    fn dim_term(&self, p: P) -> DimExpr {
        let mut it = p.into_inner();
        let mut acc = self.dim_atom(it.next().expect("grammar: dim atom"));
        for rhs in it {
            acc = DimExpr::Mul(Box::new(acc), Box::new(self.dim_atom(rhs)));
        }
        acc
    }

    fn dim_atom(&self, p: P) -> DimExpr {
        match p.as_rule() {
            Rule::int => DimExpr::Lit(p.as_str().parse().unwrap_or(i64::MAX), self.span(&p)),
            Rule::ident => DimExpr::Name(self.ident(p)),
            _ => self.dim_expr(p),
        }
    }

    fn let_decl(&self, p: P) -> LetDecl {
        let span = self.span(&p);
        let mut it = p.into_inner();
        let name = self.ident(it.next().expect("grammar: let name"));
        let mut binders = Vec::new();
        let mut value = None;
        for part in it {
            match part.as_rule() {
                Rule::binders => binders = part.into_inner().map(|b| self.binder(b)).collect(),
                Rule::expr => value = Some(self.expr(part)),
                _ => {}
            }
        }
        LetDecl {
            name,
            binders,
            value: value.expect("grammar: let value"),
            span,
        }
    }

    fn binder(&self, p: P) -> Binder {
        let mut it = p.into_inner();
        let name = self.ident(it.next().expect("grammar: binder name"));
        let mut binder = Binder {
            name,
            extent: None,
            over: None,
        };
        if let Some(extra) = it.next() {
            let inner = extra
                .clone()
                .into_inner()
                .next()
                .expect("grammar: binder extra");
            match extra.as_rule() {
                Rule::binder_extent => binder.extent = Some(self.dim_expr(inner)),
                _ => binder.over = Some(Box::new(self.expr(inner))),
            }
        }
        binder
    }

    fn expr(&self, p: P) -> Expr {
        let span = self.span(&p);
        match p.as_rule() {
            Rule::expr | Rule::primary | Rule::paren | Rule::slice_bound => {
                self.expr(p.into_inner().next().expect("grammar: inner expr"))
            }
            Rule::if_expr => {
                let mut it = p.into_inner().map(|e| Box::new(self.expr(e)));
                let (c, t, e) = (it.next(), it.next(), it.next());
                let kind = ExprKind::If {
                    cond: c.expect("grammar: if"),
                    then: t.expect("grammar: then"),
                    otherwise: e.expect("grammar: else"),
                };
                Expr { kind, span }
            }
            Rule::match_expr => {
                let mut it = p.into_inner();
                let scrutinee = Box::new(self.expr(it.next().expect("grammar: match scrutinee")));
                let arms = it.map(|arm| self.match_arm(arm)).collect();
                Expr {
                    kind: ExprKind::Match { scrutinee, arms },
                    span,
                }
            }
            Rule::or_expr | Rule::and_expr | Rule::add_expr | Rule::mul_expr | Rule::cmp_expr => {
                self.binary_chain(p)
            }
            Rule::not_expr | Rule::unary => {
                let mut it = p.into_inner();
                let first = it.next().expect("grammar: unary");
                match first.as_rule() {
                    Rule::not_op | Rule::neg_op => {
                        let op = if first.as_rule() == Rule::not_op {
                            UnOp::Not
                        } else {
                            UnOp::Neg
                        };
                        let operand = Box::new(self.expr(it.next().expect("grammar: operand")));
                        Expr {
                            kind: ExprKind::Unary { op, operand },
                            span,
                        }
                    }
                    _ => self.expr(first),
                }
            }
            Rule::power => {
                let mut it = p.into_inner();
                let base = self.expr(it.next().expect("grammar: power base"));
                match (it.next(), it.next()) {
                    (Some(_), Some(exp)) => {
                        let kind = ExprKind::Binary {
                            op: BinOp::Pow,
                            lhs: Box::new(base),
                            rhs: Box::new(self.expr(exp)),
                        };
                        Expr { kind, span }
                    }
                    _ => base,
                }
            }
            Rule::reduction => self.expr(p.into_inner().next().expect("grammar: reduction")),
            Rule::count_red | Rule::body_red => self.reduction(p),
            Rule::postfix => self.postfix(p),
            Rule::float => Expr {
                kind: ExprKind::Float(p.as_str().parse().unwrap_or(f64::NAN)),
                span,
            },
            Rule::int => match p.as_str().parse::<i64>() {
                Ok(v) => Expr {
                    kind: ExprKind::Int(v),
                    span,
                },
                Err(_) => Expr {
                    kind: ExprKind::Float(p.as_str().parse().unwrap_or(f64::INFINITY)),
                    span,
                },
            },
            Rule::true_lit => Expr {
                kind: ExprKind::Bool(true),
                span,
            },
            Rule::false_lit => Expr {
                kind: ExprKind::Bool(false),
                span,
            },
            Rule::null_lit => Expr {
                kind: ExprKind::Null,
                span,
            },
            Rule::string => Expr {
                kind: ExprKind::Str(self.string(p)),
                span,
            },
            Rule::ident => Expr {
                kind: ExprKind::Name(p.as_str().to_string()),
                span,
            },
            Rule::lambda => {
                let mut it = p.into_inner();
                let param = self.ident(it.next().expect("grammar: lambda param"));
                let body = Box::new(self.expr(it.next().expect("grammar: lambda body")));
                Expr {
                    kind: ExprKind::Lambda { param, body },
                    span,
                }
            }
            Rule::list => Expr {
                kind: ExprKind::List(p.into_inner().map(|e| self.expr(e)).collect()),
                span,
            },
            other => unreachable!("parser: unexpected rule {other:?}"),
        }
    }

    fn binary_chain(&self, p: P) -> Expr {
        let mut it = p.into_inner();
        let mut acc = self.expr(it.next().expect("grammar: operand"));
        while let (Some(op), Some(rhs)) = (it.next(), it.next()) {
            let rhs = self.expr(rhs);
            let op = match op.as_str() {
                "+" => BinOp::Add,
                "-" => BinOp::Sub,
                "*" => BinOp::Mul,
                "/" => BinOp::Div,
                "//" => BinOp::FloorDiv,
                "%" => BinOp::Rem,
                "==" => BinOp::Eq,
                "!=" => BinOp::Ne,
                "<" => BinOp::Lt,
                "<=" => BinOp::Le,
                ">" => BinOp::Gt,
                ">=" => BinOp::Ge,
                "and" => BinOp::And,
                "or" => BinOp::Or,
                _ => BinOp::In,
            };
            let span = acc.span.to(rhs.span);
            acc = Expr {
                kind: ExprKind::Binary {
                    op,
                    lhs: Box::new(acc),
                    rhs: Box::new(rhs),
                },
                span,
            };
        }
        acc
    }

    fn match_arm(&self, p: P) -> MatchArm {
        let mut patterns = Vec::new();
        let mut body = None;
        for part in p.into_inner() {
            match part.as_rule() {
                Rule::wildcard => patterns.push(None),
                Rule::ident | Rule::int | Rule::true_lit | Rule::false_lit | Rule::null_lit => {
                    patterns.push(Some(self.ident(part)))
                }
                _ => body = Some(self.expr(part)),
            }
        }
        MatchArm {
            patterns,
            body: body.expect("grammar: arm body"),
        }
    }

    fn reduction(&self, p: P) -> Expr {
        let span = self.span(&p);
        let is_count = p.as_rule() == Rule::count_red;
        let mut op = RedOp::Count;
        let mut binders = Vec::new();
        let mut filter = None;
        let mut default = None;
        let mut body = None;
        for part in p.into_inner() {
            match part.as_rule() {
                Rule::red_op => {
                    op = match part.as_str() {
                        "sum" => RedOp::Sum,
                        "mean" => RedOp::Mean,
                        "max" => RedOp::Max,
                        "min" => RedOp::Min,
                        "logsumexp" => RedOp::LogSumExp,
                        "any" => RedOp::Any,
                        _ => RedOp::All,
                    }
                }
                Rule::binder => binders.push(self.binder(part)),
                Rule::red_filter => {
                    filter = Some(Box::new(
                        self.expr(part.into_inner().next().expect("grammar: filter")),
                    ))
                }
                Rule::red_default => {
                    default = Some(Box::new(
                        self.expr(part.into_inner().next().expect("grammar: default")),
                    ))
                }
                Rule::count_kw => {}
                _ => body = Some(Box::new(self.expr(part))),
            }
        }
        debug_assert!(!is_count || body.is_none());
        Expr {
            kind: ExprKind::Reduce {
                op,
                binders,
                filter,
                default,
                body,
            },
            span,
        }
    }

    fn postfix(&self, p: P) -> Expr {
        let mut it = p.into_inner();
        let mut acc = self.expr(it.next().expect("grammar: postfix primary"));
        for suffix in it {
            let span = acc.span.to(self.span(&suffix));
            acc = match suffix.as_rule() {
                Rule::call_args => {
                    let args = suffix.into_inner().map(|a| self.arg(a)).collect();
                    Expr {
                        kind: ExprKind::Call {
                            callee: Box::new(acc),
                            args,
                        },
                        span,
                    }
                }
                _ => {
                    let items = suffix.into_inner().map(|i| self.index_item(i)).collect();
                    Expr {
                        kind: ExprKind::Index {
                            base: Box::new(acc),
                            items,
                        },
                        span,
                    }
                }
            };
        }
        acc
    }

    fn arg(&self, p: P) -> Arg {
        let mut it = p.into_inner();
        let first = it.next().expect("grammar: arg");
        match it.next() {
            Some(value) => Arg {
                name: Some(self.ident(first)),
                value: self.expr(value),
            },
            None => Arg {
                name: None,
                value: self.expr(first),
            },
        }
    }

    fn index_item(&self, p: P) -> IndexItem {
        let inner = p.into_inner().next().expect("grammar: index item");
        match inner.as_rule() {
            Rule::slice => {
                let span = self.span(&inner);
                let text = inner.as_str();
                let colon = text.find(':').unwrap_or(0) + span.start as usize;
                let mut start = None;
                let mut end = None;
                for b in inner.into_inner() {
                    if b.as_span().start() < colon {
                        start = Some(self.expr(b));
                    } else {
                        end = Some(self.expr(b));
                    }
                }
                IndexItem::Slice { start, end, span }
            }
            _ => IndexItem::At(self.expr(inner)),
        }
    }
}
