//! The recorded filesystem's node size: the length of every tree block, so
//! of every skinny `METADATA_ITEM` in the dumps (`num_bytes: null`) and of
//! every tree ref event.
//!
//! Taken, in this order, from the `--nodesize` option, from the "Node size"
//! line of `raw/mkfs.txt.gz` (the mkfs output), or from the `num_bytes` of
//! the recording's tree ref events. btrfs allows a power of two from 4 KiB
//! to 64 KiB; any other value is an input error. Every tree ref event must
//! then carry exactly that size (an error names the file and the line), so
//! an override or an mkfs line that contradicts the events is refused.

#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};

use super::events::{EventFile, EventKind};
use super::input::{InputError, for_each_gz_line};

/// The smallest node size btrfs allows.
pub const MIN_NODESIZE: u64 = 4096;
/// The largest node size btrfs allows.
pub const MAX_NODESIZE: u64 = 65536;

/// Where the node size came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeSizeSource {
    /// The `--nodesize` option.
    Option,
    /// The "Node size" line of this mkfs output file.
    Mkfs(PathBuf),
    /// The first tree ref event (this file and line).
    Events(PathBuf, usize),
}

impl fmt::Display for NodeSizeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeSizeSource::Option => write!(f, "--nodesize"),
            NodeSizeSource::Mkfs(p) => write!(f, "{} \"Node size\"", p.display()),
            NodeSizeSource::Events(p, line) => write!(f, "tree ref event at {}:{line}", p.display()),
        }
    }
}

/// The node size of a recording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSize {
    /// Bytes.
    pub bytes: u64,
    /// Where it came from.
    pub source: NodeSizeSource,
}

/// Whether btrfs allows `n` as a node size.
pub fn valid(n: u64) -> bool {
    n.is_power_of_two() && (MIN_NODESIZE..=MAX_NODESIZE).contains(&n)
}

fn check(n: u64) -> Result<u64, String> {
    if valid(n) {
        Ok(n)
    } else {
        Err(format!("node size {n} is not a power of two from {MIN_NODESIZE} to {MAX_NODESIZE}"))
    }
}

/// A node size as mkfs prints it: bytes (`16384`) or with a binary unit
/// (`16KiB`, `16.00KiB`).
fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    if let Ok(n) = v.parse::<u64>() {
        return Some(n);
    }
    let num = v.strip_suffix("KiB")?.trim();
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if !frac.bytes().all(|b| b == b'0') {
        return None;
    }
    int.parse::<u64>().ok()?.checked_mul(1024)
}

/// The "Node size" of an mkfs output file; `Ok(None)` if it has no such line.
pub fn from_mkfs(path: &Path) -> Result<Option<u64>, InputError> {
    let mut found = None;
    for_each_gz_line(path, |_, line| {
        if let Some(v) = line.trim_start().strip_prefix("Node size:") {
            if found.is_some() {
                return Err("a second \"Node size\" line".into());
            }
            let n = parse_size(v).ok_or_else(|| format!("unreadable node size {:?}", v.trim()))?;
            found = Some(check(n)?);
        }
        Ok(())
    })?;
    Ok(found)
}

/// The `num_bytes` of every tree ref event (add or run), with its file and line.
fn tree_ref_sizes<'a>(files: &'a [(PathBuf, &'a EventFile)]) -> impl Iterator<Item = (&'a Path, usize, u64)> + 'a {
    files.iter().flat_map(|(p, f)| {
        f.events.iter().filter_map(move |e| match e.kind {
            EventKind::AddRef(r) | EventKind::RunRef(r) if !r.is_data() => Some((p.as_path(), e.line, r.num_bytes)),
            _ => None,
        })
    })
}

/// Decide the node size of a run directory whose event files are `files`
/// (path, parsed): `option`, else `raw/mkfs.txt.gz`, else the tree ref
/// events; `Ok(None)` if none of them says. Every tree ref event must agree.
pub fn detect(
    run_dir: &Path,
    option: Option<u64>,
    files: &[(PathBuf, &EventFile)],
) -> Result<Option<NodeSize>, InputError> {
    let mkfs = run_dir.join("raw").join("mkfs.txt.gz");
    let chosen = match option {
        Some(n) => Some(NodeSize {
            bytes: check(n).map_err(|m| InputError::file(run_dir, m))?,
            source: NodeSizeSource::Option,
        }),
        None if mkfs.is_file() => from_mkfs(&mkfs)?.map(|n| NodeSize { bytes: n, source: NodeSizeSource::Mkfs(mkfs) }),
        None => None,
    };
    let chosen = match chosen {
        Some(c) => c,
        None => match tree_ref_sizes(files).next() {
            Some((p, line, n)) => NodeSize {
                bytes: check(n).map_err(|m| InputError::at(p, line, format!("tree ref event: {m}")))?,
                source: NodeSizeSource::Events(p.to_path_buf(), line),
            },
            None => return Ok(None),
        },
    };
    if let Some((p, line, n)) = tree_ref_sizes(files).find(|&(_, _, n)| n != chosen.bytes) {
        return Err(InputError::at(
            p,
            line,
            format!("tree ref event of {n} bytes, but the node size is {} (from {})", chosen.bytes, chosen.source),
        ));
    }
    Ok(Some(chosen))
}

#[cfg(test)]
mod tests {
    use super::super::events::{Event, RefFields};
    use super::super::input::tests::{gz, scratch};
    use super::*;
    use delayed_refs::{Action, RefKey};

    fn tree_ref(line: usize, num_bytes: u64) -> Event {
        let r = RefFields {
            bytenr: 1 << 20,
            num_bytes,
            action: Action::Add,
            parent: 0,
            root: 5,
            level: 0,
            owner: 0,
            offset: 0,
            key: RefKey::TreeBlock { root: 5 },
            seq: 0,
        };
        Event { idx: line as u64, pid: 1, line, kind: EventKind::AddRef(r) }
    }

    #[test]
    fn valid_sizes_are_the_powers_of_two_from_4k_to_64k() {
        let ok: Vec<u64> = (0..=20).map(|s| 1u64 << s).filter(|&n| valid(n)).collect();
        assert_eq!(ok, [4096, 8192, 16384, 32768, 65536]);
        for n in [0, 2048, 12288, 131072, 4095, 65537] {
            assert!(!valid(n), "{n}");
        }
    }

    #[test]
    fn mkfs_output_forms() {
        assert_eq!(parse_size("  65536"), Some(65536));
        assert_eq!(parse_size("16KiB"), Some(16384));
        assert_eq!(parse_size("16.00KiB"), Some(16384));
        assert_eq!(parse_size("16.50KiB"), None);
        assert_eq!(parse_size("big"), None);
        let d = scratch("nodesize-mkfs");
        let p = d.join("mkfs.txt.gz");
        std::fs::write(&p, gz("btrfs-progs v6.2\nLabel:  (null)\nNode size:          16384\nSector size: 4096\n"))
            .unwrap();
        assert_eq!(from_mkfs(&p).unwrap(), Some(16384));
        std::fs::write(&p, gz("Sector size: 4096\n")).unwrap();
        assert_eq!(from_mkfs(&p).unwrap(), None);
        std::fs::write(&p, gz("x\nNode size:  12288\n")).unwrap();
        let e = from_mkfs(&p).unwrap_err();
        assert!(e.line == 2 && e.msg.contains("power of two"), "{e}");
        std::fs::write(&p, gz("Node size: 4096\nNode size: 8192\n")).unwrap();
        assert!(from_mkfs(&p).unwrap_err().msg.contains("second"));
    }

    #[test]
    fn option_then_mkfs_then_events_and_every_event_must_agree() {
        let d = scratch("nodesize-detect");
        let ev = EventFile { events: vec![tree_ref(2, 16384), tree_ref(3, 16384)], ..EventFile::default() };
        let files = [(d.join("events/01_x.tsv.gz"), &ev)];
        let got = detect(&d, None, &files).unwrap().unwrap();
        assert_eq!((got.bytes, got.source), (16384, NodeSizeSource::Events(files[0].0.clone(), 2)));
        assert_eq!(detect(&d, None, &[]).unwrap(), None, "nothing says");
        assert_eq!(detect(&d, Some(16384), &files).unwrap().unwrap().source, NodeSizeSource::Option);
        let e = detect(&d, Some(4096), &files).unwrap_err();
        assert!(e.line == 2 && e.msg.contains("--nodesize"), "{e}");
        assert!(detect(&d, Some(3000), &[]).unwrap_err().msg.contains("power of two"));
        std::fs::create_dir_all(d.join("raw")).unwrap();
        std::fs::write(d.join("raw/mkfs.txt.gz"), gz("Node size: 16384\n")).unwrap();
        assert!(matches!(detect(&d, None, &files).unwrap().unwrap().source, NodeSizeSource::Mkfs(_)));
        std::fs::write(d.join("raw/mkfs.txt.gz"), gz("Node size: 65536\n")).unwrap();
        let e = detect(&d, None, &files).unwrap_err();
        assert!(e.msg.contains("mkfs.txt.gz"), "{e}");
        let mixed = EventFile { events: vec![tree_ref(2, 65536), tree_ref(9, 4096)], ..EventFile::default() };
        let e = detect(&d, None, &[(d.join("e.tsv.gz"), &mixed)]).unwrap_err();
        assert_eq!(e.line, 9, "{e}");
        let odd = EventFile { events: vec![tree_ref(4, 12288)], ..EventFile::default() };
        std::fs::remove_file(d.join("raw/mkfs.txt.gz")).unwrap();
        assert_eq!(detect(&d, None, &[(d.join("e.tsv.gz"), &odd)]).unwrap_err().line, 4);
    }
}
