//! The event files (`events/NN_phase.tsv.gz`): one kernel event per line,
//! tab-separated, `-` where a column does not apply (traces README).
//!
//! Known events are the delayed-ref set, the tree-mod-log blocker probes
//! (`kp_get_seq_entry`, `kp_get_seq`, `kp_put_seq`, `kp_check_seq`,
//! `kp_held_back`), the qgroup records (`btrfs_qgroup_trace_extent`,
//! `btrfs_qgroup_account_extents`), commits and markers; a malformed row of
//! one of them is an error naming the file and the line. Any other event
//! (a recording carries whatever events were enabled) is counted by name
//! and otherwise ignored.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
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
const C_SEQ: usize = 15;
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
    /// The tree-mod-log seq the kernel gave the ref (`seq` column).
    pub seq: u64,
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
    /// `kp_get_seq_entry`: `btrfs_get_tree_mod_seq(fs_info, elem)` entered.
    GetSeqEntry {
        /// The `struct btrfs_seq_list` address.
        elem: u64,
        /// Its seq on entry: 0 for a new blocker, else the call re-uses
        /// a registered one and registers nothing.
        seq_in: u64,
    },
    /// `kp_get_seq`: a blocker was registered with this seq.
    GetSeq {
        /// The blocker's seq.
        seq: u64,
    },
    /// `kp_put_seq`: the blocker is about to be removed.
    PutSeq {
        /// The blocker's seq.
        seq: u64,
        /// Its `struct btrfs_seq_list` address.
        elem: u64,
    },
    /// `kp_check_seq`: a selected ref with this seq is checked against the
    /// lowest blocker before it runs.
    CheckSeq {
        /// The ref's seq.
        seq: u64,
    },
    /// `kp_held_back`: the preceding check on the same task held the ref
    /// back (its head was unselected).
    HeldBack {
        /// The checked seq, when the row carries it.
        seq: Option<u64>,
    },
    /// `btrfs_qgroup_trace_extent`: a qgroup extent record inserted or
    /// found; right before a head event on the same task, that head's.
    QgroupTrace {
        /// Extent start.
        bytenr: u64,
        /// Extent length.
        num_bytes: u64,
    },
    /// `btrfs_qgroup_account_extents`: a record accounted at commit.
    QgroupAccount {
        /// Extent start.
        bytenr: u64,
    },
    /// An event outside the sets above (counted by [`read_events`]).
    Other,
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
    let seq = num(f, C_SEQ)?;
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
    Ok(RefFields { bytenr, num_bytes, action, parent, root, level, owner, offset, key, seq })
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

/// A number from `key=value` of the `extra` column.
fn extra_num(f: &[&str], event: &str, name: &str) -> Result<u64, String> {
    let extra = col(f, C_EXTRA);
    extra_value(extra, name)
        .and_then(parse_hex_or_dec)
        .ok_or_else(|| format!("{event} without a readable {name} in {extra:?}"))
}

/// A seq column that must hold a blocker's seq (never 0).
fn blocker_seq(f: &[&str]) -> Result<u64, String> {
    match num(f, C_SEQ)? {
        0 => Err("column seq is 0 on a blocker row (a blocker's seq is never 0)".into()),
        s => Ok(s),
    }
}

/// The name of the event a data line carries (the line may be malformed
/// otherwise).
pub fn event_name(line: &str) -> &str {
    line.split('\t').nth(C_EVENT).unwrap_or("")
}

/// Parse one data line (not the header). An event outside the known sets
/// parses as [`EventKind::Other`].
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
        "kp_get_seq_entry" => EventKind::GetSeqEntry {
            elem: extra_num(&f, "kp_get_seq_entry", "elem")?,
            seq_in: extra_num(&f, "kp_get_seq_entry", "seq_in")?,
        },
        "kp_get_seq" => EventKind::GetSeq { seq: blocker_seq(&f)? },
        "kp_put_seq" => EventKind::PutSeq { seq: blocker_seq(&f)?, elem: extra_num(&f, "kp_put_seq", "elem")? },
        "kp_check_seq" => EventKind::CheckSeq { seq: num(&f, C_SEQ)? },
        "kp_held_back" => EventKind::HeldBack {
            seq: match col(&f, C_SEQ) {
                "-" => None,
                _ => Some(num(&f, C_SEQ)?),
            },
        },
        "btrfs_qgroup_trace_extent" => {
            EventKind::QgroupTrace { bytenr: num(&f, C_BYTENR)?, num_bytes: num(&f, C_NUM_BYTES)? }
        }
        "btrfs_qgroup_account_extents" => EventKind::QgroupAccount { bytenr: num(&f, C_BYTENR)? },
        "" => return Err("empty event column".into()),
        _ => EventKind::Other,
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

/// The events of one file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFile {
    /// The known events, in file order.
    pub events: Vec<Event>,
    /// Rows of other events, by event name (not replayed).
    pub other: BTreeMap<String, u64>,
}

/// Read an event file: the header, then one event per line, in file order.
/// `idx` must increase strictly (it is the recorded total order), on every
/// row. Rows of events outside the known sets are counted by name in
/// [`EventFile::other`] and left out of [`EventFile::events`].
pub fn read_events(path: &Path) -> Result<EventFile, InputError> {
    let mut events = Vec::new();
    let mut other: BTreeMap<String, u64> = BTreeMap::new();
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
        if ev.kind == EventKind::Other {
            *other.entry(event_name(line).to_string()).or_insert(0) += 1;
        } else {
            events.push(ev);
        }
        Ok(())
    })?;
    if !header {
        return Err(InputError::file(path, "no header line (empty event file)"));
    }
    Ok(EventFile { events, other })
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
        assert_eq!((r.bytenr, r.num_bytes, r.action, r.level, r.seq), (30416896, 4096, Action::Add, 0, 0));

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

    /// The rows of runC-sample's blocker and qgroup probes.
    #[test]
    fn parses_blocker_and_qgroup_rows() {
        let dash = |n: usize| "-\t".repeat(n);
        let row = |event: &str, cols: &str| format!("3366\t159.2\t1\t9597\tfilefrag\t{event}\t{cols}");
        let k = |l: String| parse_line(&l, 1).map(|e| e.kind);
        assert_eq!(
            k(row("kp_get_seq_entry", &format!("{}elem=0xff4e300004a03a10,seq_in=0", dash(12)))),
            Ok(EventKind::GetSeqEntry { elem: 0xff4e300004a03a10, seq_in: 0 })
        );
        assert_eq!(
            k(row("kp_get_seq", &format!("{}1\t-\t-\tcaller=btrfs_is_data_extent_shared+0xcb/0x3e0", dash(9)))),
            Ok(EventKind::GetSeq { seq: 1 })
        );
        assert_eq!(
            k(row("kp_put_seq", &format!("{}14\t-\t-\telem=0xff4e300004adbc30", dash(9)))),
            Ok(EventKind::PutSeq { seq: 14, elem: 0xff4e300004adbc30 })
        );
        assert_eq!(k(row("kp_check_seq", &format!("{}22\t-\t-\t-", dash(9)))), Ok(EventKind::CheckSeq { seq: 22 }));
        assert_eq!(
            k(row("kp_held_back", &format!("{}26\t-\t-\tret=1", dash(9)))),
            Ok(EventKind::HeldBack { seq: Some(26) })
        );
        assert_eq!(
            k(row("kp_held_back", &format!("{}-\t-\t-\tret=1", dash(9)))),
            Ok(EventKind::HeldBack { seq: None })
        );
        assert_eq!(
            k(row("btrfs_qgroup_trace_extent", &format!("573964288\t65536\t{}-", dash(10)))),
            Ok(EventKind::QgroupTrace { bytenr: 573964288, num_bytes: 65536 })
        );
        assert_eq!(
            k(row("btrfs_qgroup_account_extents", &format!("371789824\t16384\t{}-", dash(10)))),
            Ok(EventKind::QgroupAccount { bytenr: 371789824 })
        );
        // Malformed rows of these known events name what is wrong.
        for (l, what) in [
            (row("kp_get_seq", &format!("{}0\t-\t-\tcaller=x", dash(9))), "seq is 0"),
            (row("kp_get_seq", &format!("{}-\t-\t-\tcaller=x", dash(9))), "column seq"),
            (row("kp_put_seq", &format!("{}3\t-\t-\telem=zz", dash(9))), "elem"),
            (row("kp_get_seq_entry", &format!("{}elem=0x10", dash(12))), "seq_in"),
            (row("kp_check_seq", &format!("{}x\t-\t-\t-", dash(9))), "column seq"),
            (row("btrfs_qgroup_trace_extent", &format!("-\t65536\t{}-", dash(10))), "bytenr"),
        ] {
            let e = k(l.clone()).unwrap_err();
            assert!(e.contains(what), "{l:?}: {e}");
        }
        // An event outside the known sets parses as Other, whatever its columns.
        assert_eq!(
            k(row("qgroup_num_dirty_extents", &format!("{}transid=89,num_dirty_extents=154", dash(12)))),
            Ok(EventKind::Other)
        );
    }

    #[test]
    fn malformed_lines_are_errors() {
        let good = "4\t19.45\t0\t185\tsync\tadd_delayed_tree_ref\t30416896\t4096\tADD_DELAYED_REF\t0\t1\t0\t-\t-\tTREE_BLOCK_REF\t0\t0\t-\t-";
        assert!(parse_line(good, 1).is_ok());
        let bad = [
            ("4\t19.45\t0\t185", "fields"),
            (&good.replace("30416896", "-") as &str, "bytenr"),
            (&good.replace("30416896", "12x") as &str, "bytenr"),
            (&good.replace("add_delayed_tree_ref", "") as &str, "empty event"),
            (&good.replace("\t0\t0\t-\t-", "\tx\t0\t-\t-") as &str, "column seq"),
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
        assert_eq!(read_events(&p).unwrap().events.len(), 1);

        std::fs::write(&p, gz(&format!("{HEADER}\n{good}\n1\t2.0\tgarbage\n"))).unwrap();
        let e = read_events(&p).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.to_string().contains("01_x.tsv.gz:3:"), "{e}");

        std::fs::write(&p, gz(&format!("{HEADER}\n{good}\n{good}\n"))).unwrap();
        assert!(read_events(&p).unwrap_err().msg.contains("does not increase"));

        std::fs::write(&p, gz(&format!("{good}\n"))).unwrap();
        assert_eq!(read_events(&p).unwrap_err().line, 1);

        // Events outside the known sets are counted by name, never fatal;
        // their rows must still be rows (fields, increasing idx).
        let other = |i: u64, name: &str| good.replacen("0\t", &format!("{i}\t"), 1).replace("marker", name);
        let text = format!(
            "{HEADER}\n{good}\n{}\n{}\n{}\n",
            other(1, "sched_switch"),
            other(2, "qgroup_num_dirty_extents"),
            other(3, "sched_switch")
        );
        std::fs::write(&p, gz(&text)).unwrap();
        let f = read_events(&p).unwrap();
        assert_eq!(f.events.len(), 1);
        assert_eq!(
            f.other.into_iter().collect::<Vec<_>>(),
            [("qgroup_num_dirty_extents".into(), 1), ("sched_switch".into(), 2)]
        );
        std::fs::write(&p, gz(&format!("{HEADER}\n{good}\n{}\n", other(0, "sched_switch")))).unwrap();
        assert!(read_events(&p).unwrap_err().msg.contains("does not increase"));
        std::fs::write(&p, gz(&format!("{HEADER}\n{good}\n1\t2.0\t0\t1\tsh\tsched_switch\n"))).unwrap();
        assert_eq!(read_events(&p).unwrap_err().line, 3);
        // A malformed row of a known event is still an error at its line.
        let bad_get = good.replacen("0\t", "1\t", 1).replace("marker", "kp_get_seq");
        std::fs::write(&p, gz(&format!("{HEADER}\n{good}\n{bad_get}\n"))).unwrap();
        let e = read_events(&p).unwrap_err();
        assert!(e.line == 3 && e.to_string().contains("01_x.tsv.gz:3:") && e.msg.contains("seq"), "{e}");

        let body: String = (0..3000).map(|i| good.replacen("0\t", &format!("{i}\t"), 1) + "\n").collect();
        let big = gz(&format!("{HEADER}\n{body}"));
        std::fs::write(&p, &big[..big.len() * 2 / 3]).unwrap();
        let e = read_events(&p).unwrap_err();
        assert!(e.msg.contains("truncated"), "{e}");
    }
}
