//! Embeds the standard library: every `losses/*.loss` file, sorted by name,
//! becomes an entry of `stdlib::FILES` (so adding a loss is adding a file).

use std::fmt::Write;

fn main() {
    println!("cargo:rerun-if-changed=losses");
    // Cargo's value when it runs the script (not the one baked in when the
    // script was compiled, which a moved checkout would not have).
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = std::path::Path::new(&manifest).join("losses");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("losses/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".loss"))
        .collect();
    names.sort();
    let mut out = String::from("pub const FILES: &[(&str, &str)] = &[\n");
    for n in &names {
        println!("cargo:rerun-if-changed=losses/{n}");
        let _ = writeln!(
            out,
            "    ({n:?}, include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/losses/{n}\"))),"
        );
    }
    out.push_str("];\n");
    let dest =
        std::path::Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("stdlib_files.rs");
    std::fs::write(dest, out).expect("write stdlib_files.rs");
}
