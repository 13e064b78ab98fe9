//! Diagnostics: one error (or warning) a user can act on, and its rendering.
//!
//! Every diagnostic has a stable code (`LC0xxx`, listed in `codes`), a message,
//! a primary span rendered with the source line, and an optional help line.
//! Rendering goes through miette; the text names `file:line:col`. Stages
//! collect diagnostics in a `Vec` and go on, so one run reports every error.

use super::source::{SourceMap, Span};
use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource, SourceSpan};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Clone, Debug)]
pub struct Diagnostic {
    pub code: &'static str,
    pub severity: Severity,
    pub message: String,
    pub span: Option<Span>,
    pub label: String,
    /// Further places that explain the error ("first defined here").
    pub related: Vec<(Span, String)>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(code: &'static str, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            code,
            severity: Severity::Error,
            message: message.into(),
            span: None,
            label: String::new(),
            related: Vec::new(),
            help: None,
        }
    }

    pub fn at(mut self, span: Span, label: impl Into<String>) -> Diagnostic {
        self.span = Some(span);
        self.label = label.into();
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    pub fn with_related(mut self, span: Span, label: impl Into<String>) -> Diagnostic {
        self.related.push((span, label.into()));
        self
    }

    pub fn warning(mut self) -> Diagnostic {
        self.severity = Severity::Warning;
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// `file:line:col` of the primary span, if any.
    pub fn location(&self, sources: &SourceMap) -> Option<String> {
        let span = self.span?;
        let (line, col) = sources.line_col(span.file, span.start);
        Some(format!("{}:{}:{}", sources.get(span.file).name, line, col))
    }

    /// The full report: header line with location, the source excerpt, help.
    pub fn render(&self, sources: &SourceMap) -> String {
        let kind = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let mut out = match self.location(sources) {
            Some(loc) => format!("{kind}[{}]: {loc}: {}\n", self.code, self.message),
            None => format!("{kind}[{}]: {}\n", self.code, self.message),
        };
        if let Some(span) = self.span {
            let report = Report {
                diag: self,
                source: named_source(sources, span.file),
                file: span.file,
            };
            let handler = GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor())
                .with_width(100)
                .with_context_lines(1);
            let mut body = String::new();
            if handler.render_report(&mut body, &report).is_ok() {
                // Drop miette's empty title line (`×`); the header carries the message.
                for line in body.lines().filter(|l| !matches!(l.trim(), "×" | "⚠" | "")) {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        } else if let Some(help) = &self.help {
            out.push_str(&format!("  help: {help}\n"));
        }
        out
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.code, self.message)
    }
}

/// Adapter giving miette what it needs to draw one diagnostic.
struct Report<'a> {
    diag: &'a Diagnostic,
    source: NamedSource<String>,
    file: super::source::FileId,
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.diag.message)
    }
}

// The header line already states the message; miette draws only the excerpt.
impl fmt::Display for Report<'_> {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        Ok(())
    }
}

impl std::error::Error for Report<'_> {}

impl miette::Diagnostic for Report<'_> {
    fn severity(&self) -> Option<miette::Severity> {
        Some(match self.diag.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        })
    }

    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.diag
            .help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.source)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let mut labels = Vec::new();
        if let Some(span) = self.diag.span {
            labels.push(labeled(span, &self.diag.label, true));
        }
        for (span, label) in &self.diag.related {
            if span.file == self.file {
                labels.push(labeled(*span, label, false));
            }
        }
        Some(Box::new(labels.into_iter()))
    }

    fn related<'b>(&'b self) -> Option<Box<dyn Iterator<Item = &'b dyn miette::Diagnostic> + 'b>> {
        None
    }
}

fn labeled(span: Span, label: &str, primary: bool) -> LabeledSpan {
    let len = (span.end - span.start) as usize;
    let at = SourceSpan::from((span.start as usize, len));
    let text = if label.is_empty() {
        None
    } else {
        Some(label.to_string())
    };
    if primary {
        LabeledSpan::new_primary_with_span(text, at)
    } else {
        LabeledSpan::new_with_span(text, at)
    }
}

/// The rendered reports of many diagnostics, in order.
pub fn render_all(diags: &[Diagnostic], sources: &SourceMap) -> String {
    diags
        .iter()
        .map(|d| d.render(sources))
        .collect::<Vec<_>>()
        .join("\n")
}

/// miette needs an owned source; we build one per rendering.
fn named_source(sources: &SourceMap, file: super::source::FileId) -> NamedSource<String> {
    let f = sources.get(file);
    NamedSource::new(f.name.clone(), f.text.clone())
}
