//! Property test: arbitrary trees (nested directories, random contents and exec bits, relative
//! symlinks that stay inside) survive pack → unpack exactly, and inspect agrees with unpack.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use common::{MANIFEST, write};
use proptest::prelude::*;
use px_bundle::{Limits, inspect, pack_dir, unpack};

#[derive(Debug, Clone)]
enum Node {
    File { data: Vec<u8>, exec: bool },
    Dir(BTreeMap<String, Node>),
}

fn tree() -> impl Strategy<Value = BTreeMap<String, Node>> {
    let file = (prop::collection::vec(any::<u8>(), 0..3000), any::<bool>())
        .prop_map(|(data, exec)| Node::File { data, exec });
    let node = file.prop_recursive(4, 40, 5, |inner| {
        prop::collection::btree_map("[a-z]{1,3}", inner, 0..5).prop_map(Node::Dir)
    });
    prop::collection::btree_map("[a-z]{1,3}", node, 0..6)
}

fn materialize(
    root: &Path,
    rel: &str,
    children: &BTreeMap<String, Node>,
    dirs: &mut Vec<String>,
    all: &mut Vec<String>,
) {
    for (name, node) in children {
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        all.push(path.clone());
        match node {
            Node::File { data, exec } => write(root, &path, data, *exec),
            Node::Dir(kids) => {
                fs::create_dir_all(root.join(&path)).unwrap();
                dirs.push(path.clone());
                materialize(root, &path, kids, dirs, all);
            }
        }
    }
}

/// What a tree looks like: path → (kind, content or target, mode bits that matter).
fn snapshot(root: &Path) -> BTreeMap<String, (char, Vec<u8>, u32)> {
    fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, (char, Vec<u8>, u32)>) {
        for entry in fs::read_dir(root.join(rel)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let full = root.join(&path);
            let meta = fs::symlink_metadata(&full).unwrap();
            let exec = meta.permissions().mode() & 0o111;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&full).unwrap().into_os_string().into_vec();
                out.insert(path, ('l', target, 0));
            } else if meta.is_dir() {
                out.insert(path.clone(), ('d', Vec::new(), 0));
                walk(root, &path, out);
            } else {
                out.insert(path, ('f', fs::read(&full).unwrap(), exec));
            }
        }
    }
    use std::os::unix::ffi::OsStringExt;
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn pack_then_unpack_reproduces_the_tree(
        tree in tree(),
        links in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..4),
    ) {
        let src = tempfile::tempdir().unwrap();
        let root = src.path();
        write(root, "app.toml", MANIFEST.as_bytes(), false);
        let mut dirs = vec![String::new()];
        let mut all = vec!["app.toml".to_string()];
        materialize(root, "", &tree, &mut dirs, &mut all);
        // Relative symlinks from some directory to some path: up to the root, then down.
        for (i, (at, to)) in links.iter().enumerate() {
            let dir = at.get(&dirs);
            let depth = if dir.is_empty() { 0 } else { dir.split('/').count() };
            let target = format!("{}{}", "../".repeat(depth), to.get(&all));
            let link = if dir.is_empty() { format!("ln{i}") } else { format!("{dir}/ln{i}") };
            symlink(&target, root.join(&link)).unwrap();
        }

        let mut bundle = Vec::new();
        let (summary, manifest) = pack_dir(root, &mut bundle).unwrap();
        let inspected = inspect(&bundle[..], &Limits::default()).unwrap();
        let parent = tempfile::tempdir().unwrap();
        let dest = parent.path().join("release");
        let unpacked = unpack(&bundle[..], &dest, &Limits::default()).unwrap();

        prop_assert_eq!(&inspected, &unpacked);
        prop_assert_eq!(&unpacked.manifest, &manifest);
        prop_assert_eq!(unpacked.entries, summary.entries);
        prop_assert_eq!(unpacked.unpacked_bytes, summary.unpacked_bytes);
        let before = snapshot(root);
        let after = snapshot(&dest);
        prop_assert_eq!(&before, &after);
        // Exact modes, whatever the umask: 0o755 for exec files and dirs, 0o644 otherwise.
        for (path, (kind, _, exec)) in &after {
            let mode = fs::symlink_metadata(dest.join(path)).unwrap().permissions().mode() & 0o777;
            let want = match kind { 'd' => 0o755, 'f' if *exec != 0 => 0o755, 'f' => 0o644, _ => continue };
            prop_assert_eq!(mode, want, "{}", path);
        }
        // Only the release directory is left in the parent.
        prop_assert_eq!(fs::read_dir(parent.path()).unwrap().count(), 1);
    }
}
