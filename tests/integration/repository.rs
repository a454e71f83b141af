//! The repository stands on its own: a user clones only it, so no file in it may read
//! or link a sibling folder of the clone (the design notes the project started from
//! lived in one). Every file is checked, tracked or not, except build output.

use std::path::{Path, PathBuf};

/// Spelled in two pieces so that this file does not match itself.
const SIBLING: &str = concat!("..", "/shared");
const ABSOLUTE: &str = concat!("/work", "/shared");

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        if path.is_dir() {
            // Build output and version control, not the project's files.
            if !matches!(name.as_ref(), "target" | ".git" | "corpus" | "artifacts") {
                files(&path, out);
            }
        } else {
            out.push(path);
        }
    }
}

#[test]
fn no_file_reads_or_links_outside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut all = Vec::new();
    files(root, &mut all);
    assert!(
        all.iter().any(|p| p.ends_with("README.md")),
        "walked the wrong directory: {}",
        root.display()
    );
    let offenders: Vec<String> = all
        .iter()
        .filter(|path| {
            let bytes = std::fs::read(path).unwrap_or_default();
            [SIBLING, ABSOLUTE]
                .iter()
                .any(|needle| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .map(|p| p.strip_prefix(root).unwrap().display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "these files mention a folder beside the repository, which a clone does not have: {offenders:?}"
    );
}

#[test]
fn the_captured_vectors_are_in_the_repository() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/ijam");
    for name in [
        "rsa2048_private_key.pem",
        "rsa4096_private_key.pem",
        "reg2048_request_cipher.bin",
        "reg4096_request_cipher.bin",
        "cert_response_rsa2048.pem",
        "cert_response_rsa4096.pem",
        "README.md",
    ] {
        assert!(
            dir.join(name).is_file(),
            "{} missing",
            dir.join(name).display()
        );
    }
}
