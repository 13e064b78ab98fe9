//! NVRTC: finding the library, compiling CUDA C to PTX, and the on-disk PTX
//! cache. Needs no GPU and no driver, so the CPU test suite compiles every
//! generated kernel for real.
//!
//! * Finding libnvrtc: `LOSSC_NVRTC=/path/to/libnvrtc.so.13` is loaded by that
//!   path first (the PyPI wheel `nvidia-cuda-nvrtc` puts it under
//!   `site-packages/nvidia/cu13/lib/`); cudarc's loader, which looks libraries
//!   up by name (`libnvrtc.so`, `libnvrtc.so.13`, ... through
//!   `LD_LIBRARY_PATH` and the system paths), then finds the already-loaded
//!   library by its soname. Without the variable the plain lookup by name
//!   decides. A library that is absent is an `Err`, never a panic: cudarc
//!   panics when asked for a missing library, so presence is checked first
//!   and the first call runs under `catch_unwind`.
//! * Cache: `$LOSSC_CACHE_DIR`, else `$XDG_CACHE_HOME/lossc/ptx`, else
//!   `~/.cache/lossc/ptx`, else the temp dir; one file `<key>.ptx` per
//!   program, the key a 128-bit FNV-1a hash of the source, the options and
//!   the NVRTC version. Writes are atomic (temporary file, then rename);
//!   an unreadable or unwritable cache is a miss, never an error.

use std::path::PathBuf;
use std::sync::OnceLock;

/// Loads libnvrtc once; `Err` says why it cannot be used.
pub fn load() -> Result<(u32, u32), String> {
    static LOADED: OnceLock<Result<(u32, u32), String>> = OnceLock::new();
    LOADED.get_or_init(load_once).clone()
}

fn load_once() -> Result<(u32, u32), String> {
    if let Some(path) = std::env::var_os("LOSSC_NVRTC") {
        // SAFETY: loading a shared library runs its initialisers; libnvrtc's
        // are NVIDIA's and have no preconditions.
        match unsafe { libloading::Library::new(&path) } {
            // Kept loaded for the life of the process, so that cudarc's
            // lookup by name finds it.
            Ok(lib) => std::mem::forget(lib),
            Err(e) => {
                return Err(format!(
                    "LOSSC_NVRTC={}: cannot load it: {e}",
                    PathBuf::from(path).display()
                ))
            }
        }
    }
    // SAFETY: only tries to open candidate library names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("NVRTC (libnvrtc.so) was not found: install the PyPI wheel \
             `nvidia-cuda-nvrtc` and set LOSSC_NVRTC to its lib/libnvrtc.so.13, \
             or put the CUDA toolkit's lib directory on LD_LIBRARY_PATH"
            .into());
    }
    let version = std::panic::catch_unwind(|| {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two out-pointers to live integers.
        let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        (r, major, minor)
    });
    match version {
        Ok((cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS, major, minor)) => {
            Ok((major as u32, minor as u32))
        }
        Ok((r, _, _)) => Err(format!("NVRTC does not work: nvrtcVersion returned {r:?}")),
        Err(_) => Err("NVRTC was found but could not be loaded (missing symbols)".into()),
    }
}

/// The NVRTC options of a program for `arch` (e.g. `compute_90`).
pub fn options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}")]
}

/// Compiles `source` to PTX for `arch`, without the cache.
pub fn compile(source: &str, arch: &str) -> Result<String, String> {
    load()?;
    let opts = cudarc::nvrtc::CompileOptions {
        options: options(arch),
        name: Some("lossc.cu".into()),
        ..Default::default()
    };
    let source = source.to_string();
    let result =
        std::panic::catch_unwind(move || cudarc::nvrtc::compile_ptx_with_opts(source, opts));
    match result {
        Ok(Ok(ptx)) => Ok(ptx.to_src()),
        Ok(Err(cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. })) => Err(format!(
            "NVRTC failed ({nvrtc:?}):\n{}",
            log.to_string_lossy()
        )),
        Ok(Err(e)) => Err(format!("NVRTC failed: {e}")),
        Err(_) => Err("NVRTC panicked (library incomplete?)".into()),
    }
}

/// Compiles through the on-disk cache (module doc); returns the PTX and
/// whether it came from the cache.
pub fn compile_cached(source: &str, arch: &str) -> Result<(String, bool), String> {
    let version = load()?;
    let key = cache_key(source, &options(arch), version);
    let path = cache_dir().map(|d| d.join(format!("{key}.ptx")));
    if let Some(p) = &path {
        if let Ok(ptx) = std::fs::read_to_string(p) {
            if !ptx.is_empty() {
                return Ok((ptx, true));
            }
        }
    }
    let ptx = compile(source, arch)?;
    if let Some(p) = &path {
        write_atomic(p, &ptx);
    }
    Ok((ptx, false))
}

/// The cache key: FNV-1a (128-bit) of everything the PTX depends on.
pub fn cache_key(source: &str, options: &[String], version: (u32, u32)) -> String {
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u128::from(*b);
            h = h.wrapping_mul(PRIME);
        }
        h ^= 0xff;
        h = h.wrapping_mul(PRIME);
    };
    feed(source.as_bytes());
    for o in options {
        feed(o.as_bytes());
    }
    feed(format!("nvrtc {}.{}", version.0, version.1).as_bytes());
    format!("{h:032x}")
}

fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let dir = env("LOSSC_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("lossc/ptx")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/lossc/ptx")))
        .unwrap_or_else(|| std::env::temp_dir().join("lossc-ptx"));
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

fn write_atomic(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .is_err()
    {
        let _ = std::fs::remove_file(&tmp);
    }
}
