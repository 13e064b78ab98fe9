//! Surface syntax: source files, the pest parser, the AST and diagnostics.
//!
//! This module knows nothing of the IR or of evaluation: it turns text into
//! an AST (or diagnostics) and renders diagnostics back against the text.

pub mod ast;
pub mod codes;
pub mod diag;
pub mod parse;
pub mod source;

pub use diag::{Diagnostic, Severity};
pub use source::{FileId, SourceMap, Span};
