//! The event files (`events/NN_phase.tsv.gz`): one kernel event per line,
//! tab-separated, `-` where a column does not apply (traces README).

#![forbid(unsafe_code)]

use std::path::Path;

use delayed_refs::{Action, RefKey, RefType};

use super::input::{InputError, for_each_gz_line};

/// The header every event file starts with.
pub const COLUMNS: [&str; 19] = [
    "idx",
    "ts",
    "cpu",
    "pid",
    "comm",
    "event",
    "bytenr",
    "num_bytes",
    "action",
    "parent",
    "ref_root",
    "level",
    "owner",
    "offset",
    "type",
    "seq",
    "is_data",
    "ref_mod",
    "extra",
];

const C_IDX: usize = 0;
const C_PID: usize = 3;
const C_EVENT: usize = 5;
const C_BYTENR: usize = 6;
const C_NUM_BYTES: usize = 7;
const C_ACTION: usize = 8;
const C_PARENT: usize = 9;
const C_REF_ROOT: usize = 10;
const C_LEVEL: usize = 11;
const C_OWNER: usize = 12;
const C_OFFSET: usize = 13;
const C_TYPE: usize = 14;
const C_IS_DATA: usize = 16;
const C_REF_MOD: usize = 17;
const C_EXTRA: usize = 18;

/// The fields of one ref event (`add_delayed_*_ref` or `run_delayed_*_ref`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefFields {
    /// Extent start.
    pub bytenr: u64,
    /// Extent length.
    pub num_bytes: u64,
    /// `Add` or `Drop` (`ADD_DELAYED_EXTENT` on a ref event reads as `Add`).
    pub action: Action,
    /// Parent block for shared refs, else 0.
    pub parent: u64,
    /// `ref_root` (the referencing root).
    pub root: u64,
    /// Tree level (tree refs), 0 for data.
    pub level: u8,
    /// Inode number (data refs, also shared ones), 0 for tree refs.
    pub owner: u64,
    /// File offset minus extent offset (data refs), 0 for tree refs.
    pub offset: u64,
    /// The backref, from the `type` column and its fields.
    pub key: RefKey,
}

impl RefFields {
    /// Whether this is a data ref.
    pub fn is_data(&self) -> bool {
        self.key.is_data()
    }
}

/// Which run-time kprobe carried a merged count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KpKind {
    /// `kp_inc_ref`: an add to an existing item.
    IncRef,
    /// `kp_free_extent`: a drop.
    FreeExtent,
    /// `kp_alloc_file_extent`: insert of a new data extent item.
    AllocFileExtent,
}

/// One parsed event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `add_delayed_ref_head`.
    Head {
        /// Extent start.
        bytenr: u64,
        /// Extent length.
        num_bytes: u64,
        /// `Add`, `Drop`, `AddExtent` or `UpdateHead`.
        action: Action,
        /// Data head.
        is_data: bool,
    },
    /// `add_delayed_tree_ref` / `add_delayed_data_ref`.
    AddRef(RefFields),
    /// `run_delayed_tree_ref` / `run_delayed_data_ref`.
    RunRef(RefFields),
    /// `run_delayed_ref_head`.
    RunHead {
        /// Extent start.
        bytenr: u64,
    },
    /// `kp_inc_ref`, `kp_free_extent`, `kp_alloc_file_extent`.
    Kp {
        /// Which probe.
        kind: KpKind,
        /// Extent start.
        bytenr: u64,
        /// Merged count.
        ref_mod: u64,
    },
    /// `kp_delete_head`.
    DeleteHead {
        /// Extent start.
        bytenr: u64,
        /// The head's ref_mod.
        ref_mod: i64,
    },
    /// `kp_extent_op`.
    ExtentOp {
        /// `update_key`.
        update_key: bool,
        /// `update_flags`.
        update_flags: bool,
        /// `flags_to_set`.
        flags_to_set: u64,
    },
    /// `btrfs_transaction_commit`.
    Commit,
    /// `marker`.
    Marker,
}

/// One event line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Order in the kernel's merged ring buffer.
    pub idx: u64,
    /// The traced task.
    pub pid: u32,
    /// 1-based line in the file.
    pub line: usize,
    /// What happened.
    pub kind: EventKind,
}

fn col<'a>(f: &[&'a str], c: usize) -> &'a str {
    f[c]
}

fn num(f: &[&str], c: usize) -> Result<u64, String> {
    let s = col(f, c);
    s.parse::<u64>().map_err(|_| format!("column {} is {s:?}, expected an unsigned number", COLUMNS[c]))
}

fn signed(f: &[&str], c: usize) -> Result<i64, String> {
    let s = col(f, c);
    s.parse::<i64>().map_err(|_| format!("column {} is {s:?}, expected a number", COLUMNS[c]))
}

fn flag(f: &[&str], c: usize) -> Result<bool, String> {
    match col(f, c) {
        "0" => Ok(false),
        "1" => Ok(true),
        s => Err(format!("column {} is {s:?}, expected 0 or 1", COLUMNS[c])),
    }
}

fn action(f: &[&str]) -> Result<Action, String> {
    Ok(match col(f, C_ACTION) {
        "ADD_DELAYED_REF" => Action::Add,
        "DROP_DELAYED_REF" => Action::Drop,
        "ADD_DELAYED_EXTENT" => Action::AddExtent,
        "UPDATE_DELAYED_HEAD" => Action::UpdateHead,
        s => return Err(format!("unknown action {s:?}")),
    })
}

fn ref_type(f: &[&str]) -> Result<RefType, String> {
    Ok(match col(f, C_TYPE) {
        "TREE_BLOCK_REF" => RefType::TreeBlock,
        "EXTENT_DATA_REF" => RefType::ExtentData,
        "SHARED_BLOCK_REF" => RefType::SharedBlock,
        "SHARED_DATA_REF" => RefType::SharedData,
        s => match s.parse::<u8>().ok().and_then(RefType::from_code) {
            Some(t) => t,
            None => return Err(format!("unknown ref type {s:?}")),
        },
    })
}

fn ref_fields(f: &[&str], tree: bool) -> Result<RefFields, String> {
    let bytenr = num(f, C_BYTENR)?;
    let num_bytes = num(f, C_NUM_BYTES)?;
    let action = match action(f)? {
        Action::AddExtent | Action::Add => Action::Add,
        Action::Drop => Action::Drop,
        Action::UpdateHead => return Err("UPDATE_DELAYED_HEAD on a ref event".into()),
    };
    let parent = num(f, C_PARENT)?;
    let root = num(f, C_REF_ROOT)?;
    let ty = ref_type(f)?;
    if ty.is_data() == tree {
        return Err(format!("{ty:?} on a {} ref event", if tree { "tree" } else { "data" }));
    }
    if RefType::choose(!tree, parent) != ty {
        return Err(format!("type {ty:?} does not agree with parent {parent}"));
    }
    let (level, owner, offset, key) = if tree {
        let level = num(f, C_LEVEL)?;
        let level = u8::try_from(level).map_err(|_| format!("level {level} out of range"))?;
        let key = if parent != 0 { RefKey::SharedBlock { parent } } else { RefKey::TreeBlock { root } };
        (level, 0, 0, key)
    } else {
        let objectid = num(f, C_OWNER)?;
        let offset = num(f, C_OFFSET)?;
        let key =
            if parent != 0 { RefKey::SharedData { parent } } else { RefKey::ExtentData { root, objectid, offset } };
        (0, objectid, offset, key)
    };
    Ok(RefFields { bytenr, num_bytes, action, parent, root, level, owner, offset, key })
}

/// Parse `key=value` pairs of the `extra` column.
fn extra_value<'a>(extra: &'a str, name: &str) -> Option<&'a str> {
    extra.split(',').find_map(|kv| kv.split_once('=').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim()))
}

fn parse_hex_or_dec(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parse one data line (not the header).
pub fn parse_line(line: &str, lineno: usize) -> Result<Event, String> {
    let f: Vec<&str> = line.split('\t').collect();
    if f.len() != COLUMNS.len() {
        return Err(format!("malformed line: {} tab-separated fields, expected {}", f.len(), COLUMNS.len()));
    }
    let idx = num(&f, C_IDX)?;
    let pid = u32::try_from(num(&f, C_PID)?).map_err(|_| "pid out of range".to_string())?;
    let kind = match col(&f, C_EVENT) {
        "add_delayed_ref_head" => EventKind::Head {
            bytenr: num(&f, C_BYTENR)?,
            num_bytes: num(&f, C_NUM_BYTES)?,
            action: action(&f)?,
            is_data: flag(&f, C_IS_DATA)?,
        },
        "add_delayed_tree_ref" => EventKind::AddRef(ref_fields(&f, true)?),
        "add_delayed_data_ref" => EventKind::AddRef(ref_fields(&f, false)?),
        "run_delayed_tree_ref" => EventKind::RunRef(ref_fields(&f, true)?),
        "run_delayed_data_ref" => EventKind::RunRef(ref_fields(&f, false)?),
        "run_delayed_ref_head" => EventKind::RunHead { bytenr: num(&f, C_BYTENR)? },
        "kp_inc_ref" => {
            EventKind::Kp { kind: KpKind::IncRef, bytenr: num(&f, C_BYTENR)?, ref_mod: num(&f, C_REF_MOD)? }
        }
        "kp_free_extent" => {
            EventKind::Kp { kind: KpKind::FreeExtent, bytenr: num(&f, C_BYTENR)?, ref_mod: num(&f, C_REF_MOD)? }
        }
        "kp_alloc_file_extent" => {
            EventKind::Kp { kind: KpKind::AllocFileExtent, bytenr: num(&f, C_BYTENR)?, ref_mod: num(&f, C_REF_MOD)? }
        }
        "kp_delete_head" => EventKind::DeleteHead { bytenr: num(&f, C_BYTENR)?, ref_mod: signed(&f, C_REF_MOD)? },
        "kp_extent_op" => {
            let extra = col(&f, C_EXTRA);
            let get = |name: &str| {
                extra_value(extra, name)
                    .and_then(parse_hex_or_dec)
                    .ok_or_else(|| format!("kp_extent_op without a readable {name} in {extra:?}"))
            };
            EventKind::ExtentOp {
                update_key: get("update_key")? != 0,
                update_flags: get("update_flags")? != 0,
                flags_to_set: get("flags_to_set")?,
            }
        }
        "btrfs_transaction_commit" => EventKind::Commit,
        "marker" => EventKind::Marker,
        other => return Err(format!("unknown event {other:?}")),
    };
    Ok(Event { idx, pid, line: lineno, kind })
}

/// Parse the header line.
fn check_header(line: &str) -> Result<(), String> {
    let cols: Vec<&str> = line.trim_start_matches('#').split('\t').collect();
    if cols != COLUMNS {
        return Err(format!("unexpected header {line:?}; expected #{}", COLUMNS.join("\\t")));
    }
    Ok(())
}

/// Read an event file: the header, then one event per line, in file order.
/// `idx` must increase strictly (it is the recorded total order).
pub fn read_events(path: &Path) -> Result<Vec<Event>, InputError> {
    let mut events = Vec::new();
    let mut header = false;
    let mut last_idx: Option<u64> = None;
    for_each_gz_line(path, |lineno, line| {
        if !header {
            if !line.starts_with('#') {
                return Err("missing '#idx ...' header line".into());
            }
            check_header(line)?;
            header = true;
            return Ok(());
        }
        if line.is_empty() || line.starts_with('#') {
            return Ok(());
        }
        let ev = parse_line(line, lineno)?;
        if last_idx.is_some_and(|l| ev.idx <= l) {
            return Err(format!("idx {} does not increase (previous {})", ev.idx, last_idx.unwrap_or(0)));
        }
        last_idx = Some(ev.idx);
        events.push(ev);
        Ok(())
    })?;
    if !header {
        return Err(InputError::file(path, "no header line (empty event file)"));
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::super::input::tests::{gz, scratch};
    use super::*;

    const HEADER: &str = "#idx\tts\tcpu\tpid\tcomm\tevent\tbytenr\tnum_bytes\taction\tparent\tref_root\tlevel\towner\toffset\ttype\tseq\tis_data\tref_mod\textra";

    #[test]
    fn parses_every_event_kind() {
        let l = "4\t19.45\t0\t185\tsync\tadd_delayed_tree_ref\t30416896\t4096\tADD_DELAYED_REF\t0\t1\t0\t-\t-\tTREE_BLOCK_REF\t0\t0\t-\t-";
        let e = parse_line(l, 7).unwrap();
        assert_eq!((e.idx, e.pid, e.line), (4, 185, 7));
        let EventKind::AddRef(r) = e.kind else { panic!("{e:?}") };
        assert_eq!(r.key, RefKey::TreeBlock { root: 1 });
        assert_eq!((r.bytenr, r.num_bytes, r.action, r.level), (30416896, 4096, Action::Add, 0));

        let l = "892\t207.7\t1\t1067\tkworker/u4:6\tadd_delayed_data_ref\t13631488\t16384\tDROP_DELAYED_REF\t0\t5\t-\t2806\t0\tEXTENT_DATA_REF\t0\t1\t-\t-";
        let EventKind::AddRef(r) = parse_line(l, 1).unwrap().kind else { panic!() };
        assert_eq!(r.key, RefKey::ExtentData { root: 5, objectid: 2806, offset: 0 });
        assert_eq!(r.action, Action::Drop);

        let l = "17323\t248.4\t1\t5013\tbtrfs\tadd_delayed_tree_ref\t32833536\t4096\tADD_DELAYED_REF\t32833536\t18446744073709551608\t2\t-\t-\tSHARED_BLOCK_REF\t0\t0\t-\t-";
        let EventKind::AddRef(r) = parse_line(l, 1).unwrap().kind else { panic!() };
        assert_eq!(r.key, RefKey::SharedBlock { parent: 32833536 });
        assert_eq!(r.root, (-8i64) as u64);

        let l = "3\t19.4\t0\t185\tsync\tadd_delayed_ref_head\t30416896\t4096\tADD_DELAYED_EXTENT\t-\t-\t-\t-\t-\t-\t-\t0\t-\t-";
        assert_eq!(
            parse_line(l, 1).unwrap().kind,
            EventKind::Head { bytenr: 30416896, num_bytes: 4096, action: Action::AddExtent, is_data: false }
        );
        let l = "1944\t93.8\t1\t2977\tbtrfs\tkp_extent_op\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\tupdate_key=0,update_flags=1,flags_to_set=0x100";
        assert_eq!(
            parse_line(l, 1).unwrap().kind,
            EventKind::ExtentOp { update_key: false, update_flags: true, flags_to_set: 0x100 }
        );
        let l = "619\t93.3\t0\t2974\tsync\tkp_alloc_file_extent\t205955072\t65536\t-\t0\t256\t-\t258\t0\t-\t-\t1\t3\tflags=0x0";
        assert_eq!(
            parse_line(l, 1).unwrap().kind,
            EventKind::Kp { kind: KpKind::AllocFileExtent, bytenr: 205955072, ref_mod: 3 }
        );
        let l =
            "33\t19.4\t0\t185\tsync\tkp_delete_head\t30445568\t4096\t-\t-\t-\t-\t-\t-\t-\t-\t0\t-2\ttotal_ref_mod=-1";
        assert_eq!(parse_line(l, 1).unwrap().kind, EventKind::DeleteHead { bytenr: 30445568, ref_mod: -2 });
        let l = "47\t19.4\t1\t185\tsync\tbtrfs_transaction_commit\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\tgen=7";
        assert_eq!(parse_line(l, 1).unwrap().kind, EventKind::Commit);
    }

    #[test]
    fn malformed_lines_are_errors() {
        let good = "4\t19.45\t0\t185\tsync\tadd_delayed_tree_ref\t30416896\t4096\tADD_DELAYED_REF\t0\t1\t0\t-\t-\tTREE_BLOCK_REF\t0\t0\t-\t-";
        assert!(parse_line(good, 1).is_ok());
        let bad = [
            ("4\t19.45\t0\t185", "fields"),
            (&good.replace("30416896", "-") as &str, "bytenr"),
            (&good.replace("30416896", "12x") as &str, "bytenr"),
            (&good.replace("add_delayed_tree_ref", "add_delayed_frob") as &str, "unknown event"),
            (&good.replace("ADD_DELAYED_REF", "ADD_SOMETHING") as &str, "unknown action"),
            (&good.replace("TREE_BLOCK_REF", "EXTENT_DATA_REF") as &str, "tree ref event"),
            (&good.replace("TREE_BLOCK_REF", "SHARED_BLOCK_REF") as &str, "parent"),
            (&good.replace("TREE_BLOCK_REF", "WHAT_REF") as &str, "unknown ref type"),
            (&good.replace("\t185\t", "\tpid\t") as &str, "pid"),
        ];
        for (line, what) in bad {
            let e = parse_line(line, 1).unwrap_err();
            assert!(e.contains(what), "{line:?}: {e}");
        }
    }

    #[test]
    fn files_report_file_and_line() {
        let d = scratch("events");
        let p = d.join("01_x.tsv.gz");
        let good = "0\t1.0\t0\t1\tsh\tmarker\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\tphase";
        std::fs::write(&p, gz(&format!("{HEADER}\n{good}\n"))).unwrap();
        assert_eq!(read_events(&p).unwrap().len(), 1);

        std::fs::write(&p, gz(&format!("{HEADER}\n{good}\n1\t2.0\tgarbage\n"))).unwrap();
        let e = read_events(&p).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.to_string().contains("01_x.tsv.gz:3:"), "{e}");

        std::fs::write(&p, gz(&format!("{HEADER}\n{good}\n{good}\n"))).unwrap();
        assert!(read_events(&p).unwrap_err().msg.contains("does not increase"));

        std::fs::write(&p, gz(&format!("{good}\n"))).unwrap();
        assert_eq!(read_events(&p).unwrap_err().line, 1);

        let unknown = good.replace("marker", "sched_switch");
        std::fs::write(&p, gz(&format!("{HEADER}\n{unknown}\n"))).unwrap();
        let e = read_events(&p).unwrap_err();
        assert!(e.msg.contains("unknown event") && e.line == 2, "{e}");

        let body: String = (0..3000).map(|i| good.replacen("0\t", &format!("{i}\t"), 1) + "\n").collect();
        let big = gz(&format!("{HEADER}\n{body}"));
        std::fs::write(&p, &big[..big.len() * 2 / 3]).unwrap();
        let e = read_events(&p).unwrap_err();
        assert!(e.msg.contains("truncated"), "{e}");
    }
}
