//! `weir new`: writes a handler project for one language, with weir's WIT vendored in, a build
//! script, sample messages and the results `weir test` should see for them.

use super::{Globals, bad_input};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
    C,
}

/// Write a new handler project: source, weir's WIT, `build.sh`, sample messages and the results
/// `weir test` expects for them, and a README. The project builds to a component with
/// `./build.sh` and passes `weir test` untouched.
#[derive(Debug, Args)]
pub struct NewCommand {
    /// The project's name (letters, digits and `-`; the directory and the .wasm get it)
    name: String,
    /// The handler's language
    #[arg(long, value_enum)]
    lang: Lang,
    /// Where to create the project directory [default: the current directory]
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

const WIT: &str = include_str!("../../../wit/weir.wit");
const MESSAGES: &str = include_str!("../../templates/common-messages.jsonl");
const EXPECTED: &str = include_str!("../../templates/common-expected.jsonl");
const SDK_MANIFEST: &str = include_str!("../../../guest-examples/rust/sdk/Cargo.toml");
const SDK_LIB: &str = include_str!("../../../guest-examples/rust/sdk/src/lib.rs");

/// (path in the project, contents, executable)
type File = (&'static str, &'static str, bool);

fn files(lang: Lang) -> Vec<File> {
    match lang {
        Lang::Rust => vec![
            (
                "Cargo.toml",
                include_str!("../../templates/rust/Cargo.toml"),
                false,
            ),
            (
                "src/lib.rs",
                include_str!("../../templates/rust/src/lib.rs"),
                false,
            ),
            (
                "build.sh",
                include_str!("../../templates/rust/build.sh"),
                true,
            ),
            ("weir-guest/wit/weir.wit", WIT, false),
            ("weir-guest/src/lib.rs", SDK_LIB, false),
        ],
        Lang::Python => vec![
            (
                "app.py",
                include_str!("../../templates/python/app.py"),
                false,
            ),
            (
                "build.sh",
                include_str!("../../templates/python/build.sh"),
                true,
            ),
            ("wit/weir.wit", WIT, false),
        ],
        Lang::Js => vec![
            (
                "handler.js",
                include_str!("../../templates/js/handler.js"),
                false,
            ),
            (
                "package.json",
                include_str!("../../templates/js/package.json"),
                false,
            ),
            (
                "build.sh",
                include_str!("../../templates/js/build.sh"),
                true,
            ),
            ("wit/weir.wit", WIT, false),
        ],
        Lang::C => vec![
            (
                "handler.c",
                include_str!("../../templates/c/handler.c"),
                false,
            ),
            ("build.sh", include_str!("../../templates/c/build.sh"), true),
            ("wit/weir.wit", WIT, false),
        ],
    }
}

fn readme(name: &str, lang: Lang) -> String {
    let (source, needs) = match lang {
        Lang::Rust => (
            "src/lib.rs",
            "Rust with the wasm32-wasip2 target (`rustup target add wasm32-wasip2`). Unit tests \
             run with plain `cargo test`: the vendored `weir-guest` SDK stands in for weir.",
        ),
        Lang::Python => (
            "app.py",
            "Python 3.11+ and componentize-py (`pip install componentize-py==0.25.1`).",
        ),
        Lang::Js => (
            "handler.js",
            "Node.js 20 and npm; `build.sh` installs jco and componentize-js into node_modules/.",
        ),
        Lang::C => (
            "handler.c",
            "clang and lld with the wasm32-wasi libc (Debian: `apt-get install clang lld \
             wasi-libc libclang-rt-dev-wasm32`), wit-bindgen's C generator and wasm-tools \
             (`cargo install wit-bindgen-cli@0.63.0 wasm-tools`). The WASI preview 1 adapter \
             (`wasi_snapshot_preview1.reactor.wasm`) is in this directory, written by `weir new`.",
        ),
    };
    let world = if lang == Lang::Js {
        "world `batch-consumer`: many messages per call, as a JavaScript call is expensive"
    } else {
        "world `consumer`: one message per call"
    };
    format!(
        "# {name}\n\n\
         A [weir](https://example.invalid/weir) message handler in {lang}. It upper-cases each \
         message's text and emits it to the topic named by the `output-topic` setting (default \
         `shouted`); an empty message is rejected, which dead-letters it. Change `{source}`.\n\n\
         ## Build\n\n    ./build.sh        # writes {name}.wasm\n\n{needs}\n\n\
         ## Test without a broker\n\n    weir test {name}.wasm --input messages.jsonl --expect expected.jsonl\n\n\
         `messages.jsonl` has one message per line (`payload`, and optionally `key`, `headers`); \
         `expected.jsonl` one expected result per message (what `weir test --json` prints; only the \
         fields you give are compared). Run it in CI: it exits 1 when a result differs.\n\n\
         ## Run\n\n    weir topics create input --partitions 4\n    weir topics create shouted\n    \
         weir produce input 'hello'\n    weir run --module {name}.wasm --topic input --group {name}\n\n\
         `wit/weir.wit` is weir's contract ({world}). What each \
         outcome makes weir do, and the limits a handler runs under, are in weir's authoring \
         guide (docs/authoring.md).\n",
        lang = match lang {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::Js => "JavaScript",
            Lang::C => "C",
        }
    )
}

impl NewCommand {
    /// Writes nothing outside the new directory and never opens the data directory.
    pub fn execute(self, _g: Globals) -> anyhow::Result<ExitCode> {
        let name = &self.name;
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && name.starts_with(|c: char| c.is_ascii_lowercase());
        if !valid {
            return Err(bad_input(format!(
                "`{name}` is not a usable handler name: use lower-case letters, digits and `-`, \
                 starting with a letter (at most 64), for example `order-router`"
            )));
        }
        let root = self.dir.join(name);
        if root.exists() {
            return Err(bad_input(format!(
                "{} already exists; pick another name or --dir, weir new does not overwrite",
                root.display()
            )));
        }
        let crate_name = name.replace('-', "_");
        let fill = |s: &str| {
            s.replace("{{name}}", name)
                .replace("{{crate}}", &crate_name)
        };
        let mut written = Vec::new();
        let mut write = |rel: &str, contents: &[u8], exec: bool| -> anyhow::Result<()> {
            let path = root.join(rel);
            write_file(&path, contents, exec)?;
            written.push(rel.to_string());
            Ok(())
        };
        for (rel, contents, exec) in files(self.lang) {
            write(rel, fill(contents).as_bytes(), exec)?;
        }
        if self.lang == Lang::Rust {
            // The vendored SDK finds the WIT beside it and builds outside any workspace.
            let manifest = SDK_MANIFEST
                .replace("version.workspace = true", "version = \"0.1.0\"")
                .replace("edition.workspace = true", "edition = \"2024\"")
                .replace("publish.workspace = true", "publish = false")
                .replace("wit-bindgen.workspace = true", "wit-bindgen = \"=0.63.0\"");
            write("weir-guest/Cargo.toml", manifest.as_bytes(), false)?;
        }
        if self.lang == Lang::C {
            write(
                "wasi_snapshot_preview1.reactor.wasm",
                wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
                false,
            )?;
        }
        write("messages.jsonl", MESSAGES.as_bytes(), false)?;
        write("expected.jsonl", EXPECTED.as_bytes(), false)?;
        write("README.md", readme(name, self.lang).as_bytes(), false)?;
        write(".gitignore", gitignore(self.lang).as_bytes(), false)?;
        println!("created {} ({} files)", root.display(), written.len());
        println!(
            "next: cd {} && ./build.sh && weir test {name}.wasm --input messages.jsonl --expect expected.jsonl",
            root.display()
        );
        Ok(ExitCode::SUCCESS)
    }
}

fn gitignore(lang: Lang) -> &'static str {
    match lang {
        Lang::Rust => "/target\n*.wasm\n",
        Lang::Python => "*.wasm\n__pycache__/\n",
        Lang::Js => "*.wasm\nnode_modules/\n",
        Lang::C => "/gen\n*.o\n*.wasm\n!wasi_snapshot_preview1.reactor.wasm\n",
    }
}

fn write_file(path: &Path, contents: &[u8], exec: bool) -> anyhow::Result<()> {
    let shown = path.display();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| bad_input(format!("cannot create {}: {e}", parent.display())))?;
    }
    std::fs::write(path, contents).map_err(|e| bad_input(format!("cannot write {shown}: {e}")))?;
    if exec {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| bad_input(format!("cannot make {shown} executable: {e}")))?;
    }
    Ok(())
}
