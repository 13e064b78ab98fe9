//! A program: the parsed files lossc knows (the user's, the ones they `use`,
//! and the embedded standard library), with each file's declarations.
//!
//! Loading never reads the disk itself: `use` paths are resolved through a
//! reader the caller passes in (the CLI passes `std::fs`). Problems found while
//! loading (syntax errors, duplicate declarations, missing `use` targets) are
//! collected in `diagnostics`; the files that did parse stay usable.

use crate::stdlib;
use crate::syntax::ast::{FnDecl, Item, LossDecl};
use crate::syntax::parse::parse_file;
use crate::syntax::{codes, Diagnostic, FileId, SourceMap, Span};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default)]
pub struct Module {
    pub fns: HashMap<String, FnDecl>,
    pub losses: Vec<LossDecl>,
    /// Files this one `use`s, in order.
    pub uses: Vec<FileId>,
    pub parsed: bool,
}

#[derive(Debug, Default)]
pub struct Program {
    pub sources: SourceMap,
    modules: Vec<Module>,
    pub diagnostics: Vec<Diagnostic>,
    prelude: Option<FileId>,
}

/// How `use "path"` reads a file; the CLI passes `std::fs::read_to_string`.
pub type Reader<'a> = &'a dyn Fn(&Path) -> std::io::Result<String>;

impl Program {
    /// A program holding the standard library (prelude and every stdlib loss).
    pub fn new() -> Program {
        let mut p = Program::default();
        for (name, text) in stdlib::FILES {
            let id = p.add_source(&format!("<std>/{name}"), None, text);
            if *name == "prelude.loss" {
                p.prelude = Some(id);
            }
        }
        let no_disk: Reader = &|path: &Path| {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} is not in the standard library", path.display()),
            ))
        };
        for id in 0..p.modules.len() {
            p.resolve_uses(FileId(id as u32), no_disk);
        }
        p
    }

    /// Adds and parses a file given as text, then loads what it `use`s.
    pub fn add_file(
        &mut self,
        name: &str,
        dir: Option<PathBuf>,
        text: &str,
        read: Reader,
    ) -> FileId {
        let id = self.add_source(name, dir, text);
        self.resolve_uses(id, read);
        id
    }

    fn add_source(&mut self, name: &str, dir: Option<PathBuf>, text: &str) -> FileId {
        let id = self.sources.add(name, dir, text);
        let mut module = Module::default();
        match parse_file(id, text) {
            Ok(file) => {
                module.parsed = true;
                for item in file.items {
                    self.declare(&mut module, item);
                }
            }
            Err(diags) => self.diagnostics.extend(diags),
        }
        self.modules.push(module);
        id
    }

    fn declare(&mut self, module: &mut Module, item: Item) {
        match item {
            Item::Use(u) => module.uses.push(FileId(u32::MAX - u.span.start)), // placeholder, fixed in resolve_uses
            Item::Fn(f) => {
                if let Some(prev) = module.fns.get(&f.name.name) {
                    self.diagnostics.push(duplicate(
                        "function",
                        &f.name.name,
                        f.name.span,
                        prev.name.span,
                    ));
                } else {
                    module.fns.insert(f.name.name.clone(), f);
                }
            }
            Item::Loss(l) => {
                if let Some(prev) = module.losses.iter().find(|p| p.name.name == l.name.name) {
                    self.diagnostics.push(duplicate(
                        "loss",
                        &l.name.name,
                        l.name.span,
                        prev.name.span,
                    ));
                } else {
                    module.losses.push(l);
                }
            }
        }
    }

    /// Replaces the placeholder `use` entries of a module by loaded files.
    fn resolve_uses(&mut self, id: FileId, read: Reader) {
        let placeholders = std::mem::take(&mut self.modules[id.0 as usize].uses);
        if placeholders.is_empty() {
            return;
        }
        let text = self.sources.get(id).text.clone();
        let parsed = match parse_file(id, &text) {
            Ok(f) => f,
            Err(_) => return,
        };
        let mut resolved = Vec::new();
        for item in parsed.items {
            let Item::Use(u) = item else { continue };
            match self.load_use(id, &u.path, u.span, read) {
                Some(target) => {
                    // The used file's own syntax error is reported in that file;
                    // say so here too, or this file would only see its names
                    // as unknown.
                    if self
                        .modules
                        .get(target.0 as usize)
                        .is_some_and(|m| !m.parsed)
                    {
                        self.diagnostics.push(
                            Diagnostic::error(
                                codes::USE_NOT_FOUND,
                                format!(
                                    "`{}` does not parse, so nothing it declares can be used",
                                    u.path
                                ),
                            )
                            .at(u.span, "this file has a syntax error")
                            .with_help(format!(
                                "fix the error reported in {}",
                                self.sources.get(target).name
                            )),
                        );
                    }
                    resolved.push(target)
                }
                None => continue,
            }
        }
        self.modules[id.0 as usize].uses = resolved;
    }

    fn load_use(&mut self, from: FileId, path: &str, span: Span, read: Reader) -> Option<FileId> {
        let dir = self.sources.get(from).dir.clone();
        let on_disk = dir.as_ref().map(|d| d.join(path));
        if let Some(full) = &on_disk {
            let name = full.display().to_string();
            if let Some(existing) = self.sources.find(&name) {
                return Some(existing);
            }
            if let Ok(text) = read(full) {
                let id = self.add_source(&name, full.parent().map(Path::to_path_buf), &text);
                self.resolve_uses(id, read);
                return Some(id);
            }
        }
        let std_name = format!("<std>/{path}");
        if let Some(existing) = self.sources.find(&std_name) {
            return Some(existing);
        }
        let looked = on_disk.map_or(String::new(), |p| format!("{} and ", p.display()));
        self.diagnostics.push(
            Diagnostic::error(codes::USE_NOT_FOUND, format!("cannot find `{path}`"))
                .at(span, "this file does not exist")
                .with_help(format!("looked in {looked}the standard library (losses/); paths are relative to the file that has the `use`")),
        );
        None
    }

    pub fn module(&self, id: FileId) -> &Module {
        &self.modules[id.0 as usize]
    }

    pub fn prelude(&self) -> Option<FileId> {
        self.prelude
    }

    /// Finds a function visible from `from`: its own, those of files it uses,
    /// then the prelude's.
    pub fn find_fn(&self, from: FileId, name: &str) -> Option<(FileId, &FnDecl)> {
        let module = self.module(from);
        if let Some(f) = module.fns.get(name) {
            return Some((from, f));
        }
        for u in &module.uses {
            if let Some(f) = self.module(*u).fns.get(name) {
                return Some((*u, f));
            }
        }
        let p = self.prelude?;
        self.module(p).fns.get(name).map(|f| (p, f))
    }

    /// Every function name visible from `from`, sorted.
    pub fn visible_fns(&self, from: FileId) -> Vec<String> {
        let mut names: Vec<String> = self.module(from).fns.keys().cloned().collect();
        for u in &self.module(from).uses {
            names.extend(self.module(*u).fns.keys().cloned());
        }
        if let Some(p) = self.prelude {
            names.extend(self.module(p).fns.keys().cloned());
        }
        names.sort();
        names.dedup();
        names
    }

    /// Finds a loss visible from `from` (its own, its uses', the standard library's).
    pub fn find_loss(&self, from: Option<FileId>, name: &str) -> Option<(FileId, &LossDecl)> {
        if let Some(f) = from {
            let m = self.module(f);
            if let Some(l) = m.losses.iter().find(|l| l.name.name == name) {
                return Some((f, l));
            }
            for u in &m.uses {
                if let Some(l) = self.module(*u).losses.iter().find(|l| l.name.name == name) {
                    return Some((*u, l));
                }
            }
        }
        self.std_losses()
            .into_iter()
            .find(|(_, l)| l.name.name == name)
    }

    /// Every loss of the standard library.
    pub fn std_losses(&self) -> Vec<(FileId, &LossDecl)> {
        let mut out = Vec::new();
        for (i, m) in self.modules.iter().enumerate() {
            let id = FileId(i as u32);
            if self.sources.get(id).dir.is_none() {
                out.extend(m.losses.iter().map(|l| (id, l)));
            }
        }
        out
    }

    /// The errors (not warnings) found while loading, for one file or all.
    pub fn load_errors(&self, file: Option<FileId>) -> Vec<Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.is_error() && (file.is_none() || d.span.map(|s| s.file) == file))
            .cloned()
            .collect()
    }
}

fn duplicate(what: &str, name: &str, span: Span, prev: Span) -> Diagnostic {
    Diagnostic::error(
        codes::DUPLICATE,
        format!("the {what} `{name}` is defined twice"),
    )
    .at(span, "second definition")
    .with_related(prev, "first defined here")
    .with_help(format!(
        "rename one of them; a file may define each {what} name once"
    ))
}
