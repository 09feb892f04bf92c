//! The extent-tree dumps (`extents/NN_phase.jsonl.gz`): one JSON object per
//! extent item, converted to the crate's [`ExtentItem`]. A skinny
//! `METADATA_ITEM` has no length in the dump (`num_bytes: null`): it is the
//! filesystem's node size ([`super::nodesize`]).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::Path;

use delayed_refs::{BLOCK_FLAG_FULL_BACKREF, EXTENT_FLAG_DATA, EXTENT_FLAG_TREE_BLOCK, ExtentItem, RefKey};
use serde::Deserialize;

use super::input::{InputError, for_each_gz_line};

/// One backref as dumped.
#[derive(Debug, Deserialize)]
struct RawBackref {
    #[serde(rename = "type")]
    ty: String,
    root: Option<u64>,
    parent: Option<u64>,
    objectid: Option<u64>,
    offset: Option<u64>,
    count: u64,
}

/// One extent item as dumped.
#[derive(Debug, Deserialize)]
struct RawItem {
    bytenr: u64,
    item: String,
    num_bytes: Option<u64>,
    refs: u64,
    flags: String,
    level: Option<u8>,
    backrefs: Vec<RawBackref>,
}

/// An extent-tree dump: items by bytenr.
pub type Dump = BTreeMap<u64, ExtentItem>;

fn parse_flags(s: &str) -> Result<u64, String> {
    let mut flags = 0;
    for name in s.split('|').map(str::trim) {
        flags |= match name {
            "DATA" => EXTENT_FLAG_DATA,
            "TREE_BLOCK" => EXTENT_FLAG_TREE_BLOCK,
            "FULL_BACKREF" => BLOCK_FLAG_FULL_BACKREF,
            other => return Err(format!("unknown extent flag {other:?}")),
        };
    }
    Ok(flags)
}

fn backref_key(b: &RawBackref) -> Result<RefKey, String> {
    let need = |v: Option<u64>, what: &str| v.ok_or_else(|| format!("{} backref without {what}", b.ty));
    Ok(match b.ty.as_str() {
        "TREE_BLOCK_REF" => RefKey::TreeBlock { root: need(b.root, "root")? },
        "SHARED_BLOCK_REF" => RefKey::SharedBlock { parent: need(b.parent, "parent")? },
        "EXTENT_DATA_REF" => RefKey::ExtentData {
            root: need(b.root, "root")?,
            objectid: need(b.objectid, "objectid")?,
            offset: need(b.offset, "offset")?,
        },
        "SHARED_DATA_REF" => RefKey::SharedData { parent: need(b.parent, "parent")? },
        other => return Err(format!("unknown backref type {other:?}")),
    })
}

/// Convert one JSON line to `(bytenr, item)`. `nodesize` is the length of a
/// tree block (`None`: unknown, then a skinny item is an error).
pub fn parse_item(line: &str, nodesize: Option<u64>) -> Result<(u64, ExtentItem), String> {
    let raw: RawItem = serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
    let flags = parse_flags(&raw.flags)?;
    let is_data = flags & EXTENT_FLAG_DATA != 0;
    if is_data == (flags & EXTENT_FLAG_TREE_BLOCK != 0) {
        return Err(format!("flags {:?} are neither DATA nor TREE_BLOCK alone", raw.flags));
    }
    let num_bytes = match (raw.item.as_str(), raw.num_bytes) {
        ("METADATA_ITEM", None) => nodesize.ok_or_else(|| {
            "a METADATA_ITEM has the node size as its length, and the node size is unknown (no raw/mkfs.txt.gz \
             \"Node size\" line, no tree ref event; pass --nodesize)"
                .to_string()
        })?,
        ("METADATA_ITEM" | "EXTENT_ITEM", Some(n)) if n > 0 => n,
        (item, n) => return Err(format!("item {item:?} with num_bytes {n:?}")),
    };
    if is_data && raw.item != "EXTENT_ITEM" {
        return Err(format!("data extent in a {} item", raw.item));
    }
    if let Some(ns) = nodesize
        && !is_data
        && num_bytes != ns
    {
        return Err(format!("tree block of {num_bytes} bytes, but the node size is {ns}"));
    }
    let mut backrefs = BTreeMap::new();
    for b in &raw.backrefs {
        let key = backref_key(b)?;
        if key.is_data() != is_data {
            return Err(format!("{} backref on a {} extent", b.ty, if is_data { "data" } else { "tree" }));
        }
        if b.count == 0 {
            return Err(format!("{} backref with count 0", b.ty));
        }
        *backrefs.entry(key).or_insert(0u64) += b.count;
    }
    let sum: u64 = backrefs.values().sum();
    if sum != raw.refs {
        return Err(format!("refs {} but the backref counts sum to {sum}", raw.refs));
    }
    let item =
        ExtentItem { num_bytes, is_data, refs: raw.refs, flags, level: raw.level.unwrap_or(0), key: None, backrefs };
    Ok((raw.bytenr, item))
}

/// Read a dump file; `nodesize` as for [`parse_item`].
pub fn read_dump(path: &Path, nodesize: Option<u64>) -> Result<Dump, InputError> {
    let mut dump = Dump::new();
    for_each_gz_line(path, |_, line| {
        if line.trim().is_empty() {
            return Ok(());
        }
        let (bytenr, item) = parse_item(line, nodesize)?;
        if dump.insert(bytenr, item).is_some() {
            return Err(format!("extent {bytenr} appears twice"));
        }
        Ok(())
    })?;
    Ok(dump)
}

#[cfg(test)]
mod tests {
    use super::super::input::tests::{gz, scratch};
    use super::*;

    const TREE: &str = r#"{"bytenr":22024192,"item":"METADATA_ITEM","num_bytes":null,"refs":1,"gen":6,"flags":"TREE_BLOCK","level":0,"backrefs":[{"type":"TREE_BLOCK_REF","root":3,"count":1,"inline":true}]}"#;
    const DATA: &str = r#"{"bytenr":355860480,"item":"EXTENT_ITEM","num_bytes":8192,"refs":3,"gen":63,"flags":"DATA","level":null,"backrefs":[{"type":"SHARED_DATA_REF","parent":579584000,"count":1,"inline":true},{"type":"EXTENT_DATA_REF","root":5,"objectid":257,"offset":0,"count":2,"inline":false}]}"#;

    #[test]
    fn parses_items() {
        let (b, it) = parse_item(TREE, Some(4096)).unwrap();
        assert_eq!(b, 22024192);
        assert_eq!(
            (it.num_bytes, it.is_data, it.refs, it.flags, it.level),
            (4096, false, 1, EXTENT_FLAG_TREE_BLOCK, 0)
        );
        assert_eq!(it.backrefs[&RefKey::TreeBlock { root: 3 }], 1);
        let (_, it) = parse_item(DATA, Some(4096)).unwrap();
        assert_eq!((it.num_bytes, it.is_data, it.refs, it.flags), (8192, true, 3, EXTENT_FLAG_DATA));
        assert_eq!(it.backrefs[&RefKey::ExtentData { root: 5, objectid: 257, offset: 0 }], 2);
        assert_eq!(it.backrefs[&RefKey::SharedData { parent: 579584000 }], 1);
        let fb = TREE.replace(r#""TREE_BLOCK""#, r#""TREE_BLOCK|FULL_BACKREF""#);
        assert_eq!(parse_item(&fb, Some(4096)).unwrap().1.flags, EXTENT_FLAG_TREE_BLOCK | BLOCK_FLAG_FULL_BACKREF);
    }

    /// A skinny item takes the node size; without one it is an error, and a
    /// tree block of another length is one too.
    #[test]
    fn skinny_items_take_the_node_size() {
        for ns in [4096, 8192, 16384, 32768, 65536] {
            assert_eq!(parse_item(TREE, Some(ns)).unwrap().1.num_bytes, ns);
            assert_eq!(parse_item(DATA, Some(ns)).unwrap().1.num_bytes, 8192, "data keeps its length");
        }
        assert!(parse_item(TREE, None).unwrap_err().contains("--nodesize"));
        assert_eq!(parse_item(DATA, None).unwrap().1.num_bytes, 8192);
        let fat = TREE.replace(r#""num_bytes":null"#, r#""num_bytes":16384"#);
        assert_eq!(parse_item(&fat, Some(16384)).unwrap().1.num_bytes, 16384);
        assert!(parse_item(&fat, Some(4096)).unwrap_err().contains("node size is 4096"));
    }

    #[test]
    fn malformed_items_are_errors() {
        for (line, what) in [
            (TREE.replace(r#""refs":1"#, r#""refs":2"#), "sum"),
            (TREE.replace("TREE_BLOCK_REF", "BOGUS_REF"), "unknown backref"),
            (TREE.replace(r#""TREE_BLOCK""#, r#""WEIRD""#), "unknown extent flag"),
            (TREE.replace(r#""root":3,"#, ""), "without root"),
            (TREE.replace("TREE_BLOCK_REF", "SHARED_DATA_REF"), "parent"),
            (TREE[..40].to_string(), "malformed JSON"),
            (DATA.replace(r#""num_bytes":8192"#, r#""num_bytes":null"#), "num_bytes"),
        ] {
            let e = parse_item(&line, Some(4096)).unwrap_err();
            assert!(e.contains(what), "{line}: {e}");
        }
    }

    #[test]
    fn files_report_file_and_line() {
        let d = scratch("dump");
        let p = d.join("00_mkfs.jsonl.gz");
        std::fs::write(&p, gz(&format!("{TREE}\n{DATA}\n"))).unwrap();
        assert_eq!(read_dump(&p, Some(4096)).unwrap().len(), 2);
        std::fs::write(&p, gz(&format!("{TREE}\n{DATA}\n{{\"bytenr\":1\n"))).unwrap();
        let e = read_dump(&p, Some(4096)).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        std::fs::write(&p, gz(&format!("{TREE}\n{TREE}\n"))).unwrap();
        assert!(read_dump(&p, Some(4096)).unwrap_err().msg.contains("twice"));
        let full = gz(&format!("{TREE}\n").repeat(1).replace("22024192", "1"));
        std::fs::write(&p, &full[..full.len() - 6]).unwrap();
        assert!(read_dump(&p, Some(4096)).is_err());
    }
}
