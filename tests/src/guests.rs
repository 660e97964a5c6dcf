//! The guest components the tests run: the Rust examples built by cargo in the guests' test
//! profile, and the `orders` example in Python, JavaScript and C built with their toolchains,
//! once for every test process and later runs (kept under `target/weir-test-guests/`).

use crate::{root, shared_dir, with_lock};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The profile the tests build the Rust guests with (guest-examples/Cargo.toml): release
/// without LTO, so a change to a guest or the SDK rebuilds in seconds.
const GUEST_PROFILE: &str = "guest-test";

/// The component built from `guest-examples/rust/<name>`, built (once per test process; cargo
/// finds the build fresh after the first) in the guests' test profile.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let manifest = root().join("guest-examples").join("Cargo.toml");
        let status = cargo()
            .current_dir(root().join("guest-examples"))
            .env_remove("CARGO_TARGET_DIR")
            .args([
                "build",
                "--quiet",
                "--profile",
                GUEST_PROFILE,
                "--target",
                "wasm32-wasip2",
                "--manifest-path",
            ])
            .arg(&manifest)
            .status()
            .expect("run cargo build for the guest examples");
        assert!(
            status.success(),
            "building the guest examples failed (is the wasm32-wasip2 target installed?)"
        );
        root()
            .join("guest-examples/target/wasm32-wasip2")
            .join(GUEST_PROFILE)
    });
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.is_file(), "no guest component at {}", path.display());
    path
}

/// The languages weir's example handlers are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lang {
    Rust,
    Python,
    Js,
    C,
}

impl Lang {
    pub const ALL: [Lang; 4] = [Lang::Rust, Lang::Python, Lang::Js, Lang::C];

    pub fn name(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Js => "js",
            Lang::C => "c",
        }
    }
}

/// Runs a guest's build script; panics with its output (and what to install) if it fails.
pub fn run_build(dir: &Path, cmd: &mut Command, needs: &str) {
    let out = cmd
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot start the build in {}: {e}; {needs}", dir.display()));
    assert!(
        out.status.success(),
        "building {} failed ({needs}):\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes the WASI preview 1 adapter (from its crate) where C builds can find it.
pub fn preview1_adapter() -> PathBuf {
    let path = std::env::temp_dir().join(format!("weir-tests-adapter-{}.wasm", std::process::id()));
    if !path.is_file() {
        std::fs::write(
            &path,
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )
        .expect("write the adapter");
    }
    path
}

/// The `orders` example in `lang`, built with its language's toolchain
/// (scripts/setup-guests.sh installs them) once for every test process of a run and for later
/// runs: the component is kept under `target/weir-test-guests/`, named by a digest of the
/// example's sources and the WIT contract, and built again only when they change.
pub fn orders_in(lang: Lang) -> PathBuf {
    if lang == Lang::Rust {
        return guest("orders");
    }
    static BUILT: OnceLock<Mutex<HashMap<Lang, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(&lang) {
        return p.clone();
    }
    let dir = root()
        .join("guest-examples")
        .join(lang.name())
        .join("orders");
    // The digest is taken under the lock: another process may be building in `dir`.
    let cached = with_lock(&format!("guest-{}", lang.name()), || {
        let cached = shared_dir("weir-test-guests").join(format!(
            "orders-{}-{}.wasm",
            lang.name(),
            sources_digest(&[&dir, &root().join("wit")])
        ));
        if cached.is_file() {
            return cached;
        }
        match lang {
            Lang::Rust => unreachable!("built by cargo above"),
            Lang::Python => run_build(
                &dir,
                &mut Command::new("./build.sh"),
                "needs componentize-py: scripts/setup-guests.sh",
            ),
            Lang::Js => {
                npm_install(&dir);
                run_build(
                    &dir,
                    Command::new("npm").args(["run", "--silent", "build"]),
                    "needs jco from npm: scripts/setup-guests.sh",
                );
            }
            Lang::C => run_build(
                &dir,
                Command::new("./build.sh").env("ADAPTER", preview1_adapter()),
                "needs clang, wasi-libc, wit-bindgen and wasm-tools: scripts/setup-guests.sh",
            ),
        }
        let out = dir.join("orders.wasm");
        assert!(out.is_file(), "no component at {}", out.display());
        let tmp = cached.with_extension(format!("tmp{}", std::process::id()));
        std::fs::copy(&out, &tmp).expect("copy the component to the test cache");
        std::fs::rename(&tmp, &cached).expect("move the component into the test cache");
        cached
    });
    built.insert(lang, cached.clone());
    cached
}

/// The JavaScript example's `node_modules/` (jco), installed with `npm ci` once, under the
/// JS example's lock: another test may link to it, and must not see it half filled.
pub fn js_node_modules() -> PathBuf {
    let dir = root().join("guest-examples/js/orders");
    with_lock("guest-js", || npm_install(&dir));
    dir.join("node_modules")
}

fn npm_install(dir: &Path) {
    // `npm ci` writes this file last: a node_modules/ without it is an install cut short.
    if !dir.join("node_modules/.package-lock.json").is_file() {
        run_build(
            dir,
            Command::new("npm").args(["ci", "--no-audit", "--no-fund"]),
            "needs Node.js and npm",
        );
    }
}

/// A digest of every file under `dirs` (names and contents, in a fixed order), leaving out what
/// builds and tools write there: `orders.wasm`, `*.core.wasm`, `gen/`, `node_modules/`,
/// `__pycache__/`, dot files; a file that vanishes while it is read is left out too.
pub fn sources_digest(dirs: &[&Path]) -> String {
    use sha2::{Digest, Sha256};
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if matches!(name, "gen" | "node_modules" | "orders.wasm" | "__pycache__")
                || name.ends_with(".core.wasm")
                || name.starts_with('.')
            {
                continue;
            }
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut h = Sha256::new();
    for dir in dirs {
        let mut files = Vec::new();
        walk(dir, &mut files);
        for f in files {
            let bytes = match std::fs::read(&f) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => panic!("read {}: {e}", f.display()),
            };
            h.update(
                f.strip_prefix(root())
                    .unwrap_or(&f)
                    .to_string_lossy()
                    .as_bytes(),
            );
            h.update([0]);
            h.update(bytes);
        }
    }
    hex::encode(&h.finalize()[..8])
}
