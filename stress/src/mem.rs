//! The `mem` subcommand: live heap bytes per pending ref and per head, and
//! whether a root returns to its baseline once everything ran, for each
//! implementation, with the binary's counting allocator ([`crate::alloc`]).
//!
//! Everything runs on the calling thread and nothing else in the process
//! allocates meanwhile, so the differences of [`alloc::live`] readings are
//! exactly what the root allocated and freed between them. No reading is
//! taken while the extent tree holds anything: the extents that the final
//! run writes go to a tree created for that run and dropped before the last
//! reading.

use delayed_refs::{Action, DelayedRefs, FsConfig, MemExtentTree, RefKey, RunMode, TransHandle};
use serde::Serialize;

use crate::alloc::{self, Live, SizeTable, TABLE_LEN};
use crate::cli::MemArgs;
use crate::impls::{self, ImplVisitor};
use crate::workloads::ops::{DATA_BYTES, ROOT, TREE_BYTES, bytenr_of, generic_ref};

/// Exit code when a root does not return to its baseline or a step fails.
const EXIT_FAIL: i32 = 1;
/// Exit code for a usage error.
const EXIT_USAGE: i32 = 2;

/// Keys added to each existing head for the per-ref figure.
pub const KEYS_PER_HEAD: usize = 4;

/// Target bytes per pending ref.
pub const TARGET_REF: f64 = 56.0;
/// Target bytes per head.
pub const TARGET_HEAD: f64 = 128.0;

/// How the figures are defined (printed, and in `--help`).
pub const DEFINITIONS: &str = "\
bytes: live heap bytes as requested from the global allocator (Layout::size), \
malloc headers and rounding not included; est_malloc: the same blocks at glibc chunk sizes (size+8 rounded up to 16, \
min 32), an estimate.
bytes_per_ref: growth of live bytes while R refs with new keys are added to R/4 heads that already exist \
(4 keys per head), divided by R.
bytes_per_head: growth of live bytes while H new heads are created with exactly one ref each, divided by H, \
minus bytes_per_ref.
baseline_restored: the root is created, warmed up by an add, run(All) and reclaim() cycle on 64 extents per \
kind (so that every shard of a sharded root has been used) and one more on one extent per kind, and its live bytes are read (the baseline); after all measured refs are queued, run(RunMode::All) into a fresh extent tree, reclaim(), \
and the drop of that tree, live bytes and live blocks equal the baseline, allowing only the epoch collector's fixed bookkeeping: at most one block of at most 4 KiB (crossbeam-epoch keeps its garbage queue's previous sentinel, one 2072-byte bag block, until the next collection; it does not grow with the work, the residue columns show it exactly).
settled_restored: the same with one more reclaim() on each side: the baseline read after a second reclaim(), \
the end read after a second reclaim().
The headline figures are for data refs (EXTENT_DATA_REF keys); tree refs (SHARED_BLOCK_REF keys) are reported beside.";

/// Data or tree refs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Data,
    Tree,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Data => "data",
            Kind::Tree => "tree",
        }
    }

    /// Bytenr owner ids (see `bytenr_of`) of the heads that get more keys
    /// and of the one-ref heads.
    fn owners(self) -> (u64, u64) {
        match self {
            Kind::Data => (1, 2),
            Kind::Tree => (3, 4),
        }
    }

    /// The `n`th distinct key of a head; key 0 allocates the extent.
    fn key(self, n: u64) -> RefKey {
        match (self, n) {
            (Kind::Data, _) => RefKey::ExtentData { root: ROOT, objectid: 257 + n, offset: 0 },
            (Kind::Tree, 0) => RefKey::TreeBlock { root: ROOT },
            (Kind::Tree, _) => RefKey::SharedBlock { parent: (1 << 40) + n * TREE_BYTES },
        }
    }
}

/// Queue key number `n` on the extent at `bytenr`; key 0 is the allocating
/// `AddExtent` ref (with reserved bytes for data, without an extent op for a
/// tree block, so the head holds exactly one ref and nothing else).
fn add<D: DelayedRefs>(refs: &D, trans: &mut TransHandle, kind: Kind, bytenr: u64, n: u64) -> Result<(), String> {
    let action = if n == 0 { Action::AddExtent } else { Action::Add };
    let key = kind.key(n);
    let gref = generic_ref(action, bytenr, &key);
    let r = match kind {
        Kind::Data => refs.add_data_ref(trans, &gref, if n == 0 { DATA_BYTES } else { 0 }),
        Kind::Tree => refs.add_tree_ref(trans, &gref, None),
    };
    r.map(|_| ()).map_err(|e| format!("{action:?} {key:?} at {bytenr}: {}", crate::out::Chain(&e)))
}

/// Blocks of one size per measured unit (a ref or a head).
#[derive(Clone, Debug, Serialize)]
pub struct SizeRow {
    /// Requested block size in bytes (the last table row: this size or more).
    pub size: usize,
    /// Net live blocks of that size per unit.
    pub per_unit: f64,
}

/// The figures of one kind of ref.
#[derive(Clone, Debug, Serialize)]
pub struct KindFigures {
    /// `data` or `tree`.
    pub kind: &'static str,
    /// Refs added to existing heads (R).
    pub refs: usize,
    /// New one-ref heads (H).
    pub heads: usize,
    /// Live bytes per added ref.
    pub bytes_per_ref: f64,
    /// Live bytes per new head, less `bytes_per_ref`.
    pub bytes_per_head: f64,
    /// Live bytes per new head with its one ref (`bytes_per_head + bytes_per_ref`).
    pub bytes_per_head_with_ref: f64,
    /// Live blocks per added ref.
    pub blocks_per_ref: f64,
    /// Live blocks per new head, less `blocks_per_ref`.
    pub blocks_per_head: f64,
    /// `bytes_per_ref` at estimated glibc chunk sizes.
    pub est_malloc_bytes_per_ref: f64,
    /// `bytes_per_head` at estimated glibc chunk sizes.
    pub est_malloc_bytes_per_head: f64,
    /// What one added ref allocated, by block size.
    pub ref_blocks: Vec<SizeRow>,
    /// What one new head with its one ref allocated, by block size.
    pub head_with_ref_blocks: Vec<SizeRow>,
}

/// One implementation's results.
#[derive(Clone, Debug, Serialize)]
pub struct ImplMem {
    /// Implementation name.
    #[serde(rename = "impl")]
    pub impl_name: &'static str,
    /// Data refs: live bytes per added ref.
    pub bytes_per_ref: f64,
    /// Data refs: live bytes per new head, less `bytes_per_ref`.
    pub bytes_per_head: f64,
    /// Live bytes and blocks came back to the baseline exactly.
    pub baseline_restored: bool,
    /// Live bytes at the baseline (the whole process).
    pub baseline_bytes: i64,
    /// Live bytes with every measured ref queued, less the baseline.
    pub pending_bytes: i64,
    /// Live bytes of the extent tree the final run wrote, measured by its drop.
    pub extent_tree_bytes: i64,
    /// Live bytes after run, reclaim and the tree's drop, less the baseline.
    pub residue_bytes: i64,
    /// Live blocks after run, reclaim and the tree's drop, less the baseline.
    pub residue_blocks: i64,
    /// Live blocks left over from the baseline, by size (empty when restored).
    pub residue_by_size: Vec<SizeRow>,
    /// Live bytes after one more reclaim() at the end, less the live bytes
    /// read after one more reclaim() at the start (the baseline read after
    /// two reclaim() calls, the end read after two).
    pub settled_residue_bytes: i64,
    /// The same for live blocks.
    pub settled_residue_blocks: i64,
    /// The settled residue is within the collector bookkeeping allowance.
    pub settled_restored: bool,
    /// Merged refs the final run applied.
    pub refs_run: u64,
    /// The data-ref figures.
    pub data: KindFigures,
    /// The tree-ref figures.
    pub tree: KindFigures,
}

/// Sizes of the measurement.
#[derive(Clone, Copy, Debug)]
pub struct MemConfig {
    /// Refs added to existing heads (rounded up to a multiple of 4).
    pub refs: usize,
    /// New one-ref heads.
    pub heads: usize,
}

/// Buffers for the size table, allocated before the baseline so that
/// taking the table between two readings allocates nothing.
struct Tables {
    scratch: Box<[i64]>,
    /// Per kind: the refs phase.
    refs: [Box<[i64]>; 2],
    /// Per kind: the new-heads phase.
    heads: [Box<[i64]>; 2],
    /// Everything taken so far, summed.
    total: Box<[i64]>,
}

/// Which buffer a take goes to.
#[derive(Clone, Copy)]
enum Buf {
    Scratch,
    Refs(Kind),
    Heads(Kind),
}

impl Tables {
    fn new() -> Self {
        let t = || vec![0i64; TABLE_LEN].into_boxed_slice();
        Tables { scratch: t(), refs: [t(), t()], heads: [t(), t()], total: t() }
    }

    /// Take the size table into `which` and add it to the total.
    fn take(&mut self, table: &SizeTable, which: Buf) {
        let buf = match which {
            Buf::Scratch => &mut self.scratch,
            Buf::Refs(k) => &mut self.refs[k as usize],
            Buf::Heads(k) => &mut self.heads[k as usize],
        };
        table.take_into(buf);
        for (t, b) in self.total.iter_mut().zip(buf.iter()) {
            *t += *b;
        }
    }
}

fn rows(table: &[i64], units: usize) -> Vec<SizeRow> {
    let mut v: Vec<SizeRow> = alloc::nonzero_rows(table)
        .into_iter()
        .map(|(size, n)| SizeRow { size, per_unit: n as f64 / units as f64 })
        .collect();
    v.sort_by(|a, b| (b.per_unit * b.size as f64).total_cmp(&(a.per_unit * a.size as f64)));
    v
}

/// The readings of one kind's phases (nothing allocated to hold them).
#[derive(Clone, Copy, Debug)]
struct Readings {
    kind: Kind,
    refs: usize,
    heads: usize,
    /// Before the refs phase, after it, after the new-heads phase.
    l1: Live,
    l2: Live,
    l3: Live,
}

/// Measure one kind: `refs / 4` heads with one ref, then 4 more keys on
/// each, then `heads` new one-ref heads.
fn measure_kind<D: DelayedRefs>(
    refs: &D,
    trans: &mut TransHandle,
    kind: Kind,
    cfg: MemConfig,
    table: &SizeTable,
    t: &mut Tables,
) -> Result<Readings, String> {
    let (own_a, own_b) = kind.owners();
    let ref_heads = cfg.refs.div_ceil(KEYS_PER_HEAD).max(1);
    for h in 0..ref_heads {
        add(refs, trans, kind, bytenr_of(own_a, h as u64), 0)?;
    }
    t.take(table, Buf::Scratch);
    let l1 = alloc::live();
    for k in 1..=KEYS_PER_HEAD as u64 {
        for h in 0..ref_heads {
            add(refs, trans, kind, bytenr_of(own_a, h as u64), k)?;
        }
    }
    let l2 = alloc::live();
    t.take(table, Buf::Refs(kind));
    for h in 0..cfg.heads {
        add(refs, trans, kind, bytenr_of(own_b, h as u64), 0)?;
    }
    let l3 = alloc::live();
    t.take(table, Buf::Heads(kind));
    Ok(Readings { kind, refs: ref_heads * KEYS_PER_HEAD, heads: cfg.heads, l1, l2, l3 })
}

/// The figures from one kind's readings and size tables.
fn figures(m: &Readings, t: &Tables) -> KindFigures {
    let (r, hd) = (m.l2.since(m.l1), m.l3.since(m.l2));
    let per = |x: i64, n: usize| x as f64 / n as f64;
    let bytes_per_ref = per(r.bytes, m.refs);
    let blocks_per_ref = per(r.blocks, m.refs);
    let est = |table: &[i64], n: usize| {
        table.iter().enumerate().map(|(size, c)| *c * alloc::chunk_estimate(size) as i64).sum::<i64>() as f64 / n as f64
    };
    let chunk_per_ref = est(&t.refs[m.kind as usize], m.refs);
    KindFigures {
        kind: m.kind.as_str(),
        refs: m.refs,
        heads: m.heads,
        bytes_per_ref,
        bytes_per_head: per(hd.bytes, m.heads) - bytes_per_ref,
        bytes_per_head_with_ref: per(hd.bytes, m.heads),
        blocks_per_ref,
        blocks_per_head: per(hd.blocks, m.heads) - blocks_per_ref,
        est_malloc_bytes_per_ref: chunk_per_ref,
        est_malloc_bytes_per_head: est(&t.heads[m.kind as usize], m.heads) - chunk_per_ref,
        ref_blocks: rows(&t.refs[m.kind as usize], m.refs),
        head_with_ref_blocks: rows(&t.heads[m.kind as usize], m.heads),
    }
}

/// Extents each kind's warm-up queues: enough that every shard of a sharded
/// root (`ShardedRefs`, 16 shards) gets one of the 2 x 64, so each makes its first-use
/// allocation (the empty leaf its ordered map keeps, as the locked port's
/// one map does) before the baseline is read (checked by
/// `warm_up_reaches_every_shard`).
const WARM_EXTENTS: u64 = 64;

/// Add, `run(All)` and `reclaim()` on a throwaway tree, twice: one add per
/// extent on [`WARM_EXTENTS`] extents per kind, then one add per kind (so
/// the epoch collector's queue ends as after a one-add cycle, whatever the
/// first cycle retired).
fn warm_up<D: DelayedRefs>(refs: &D, trans: &mut TransHandle) -> Result<(), String> {
    for extents in [WARM_EXTENTS, 1] {
        let tree = MemExtentTree::new();
        for kind in [Kind::Data, Kind::Tree] {
            for i in 0..extents {
                add(refs, trans, kind, bytenr_of(5, 2 * i + kind as u64), 0)?;
            }
        }
        refs.run(&tree, RunMode::All).map_err(|e| format!("warm-up run: {}", crate::out::Chain(&e)))?;
        refs.reclaim();
    }
    Ok(())
}

/// The whole measurement for implementation `D`.
pub fn measure<D: DelayedRefs>(cfg: MemConfig) -> Result<ImplMem, String> {
    let mut t = Tables::new();
    let refs = D::new(FsConfig::default());
    let mut trans = TransHandle::new();
    warm_up(&refs, &mut trans)?;
    let base = alloc::live();
    let table = SizeTable::start();
    // The settled check's baseline: one more reclaim() first.
    refs.reclaim();
    let base2 = alloc::live();
    let data = measure_kind(&refs, &mut trans, Kind::Data, cfg, &table, &mut t)?;
    let tree_figs = measure_kind(&refs, &mut trans, Kind::Tree, cfg, &table, &mut t)?;
    let pending = alloc::live();
    let ext = MemExtentTree::new();
    let stats = refs.run(&ext, RunMode::All).map_err(|e| format!("run(All): {}", crate::out::Chain(&e)))?;
    refs.reclaim();
    let with_tree = alloc::live();
    let c = refs.counters();
    drop(ext);
    let end = alloc::live();
    t.take(&table, Buf::Scratch);
    drop(table);
    refs.reclaim();
    let end2 = alloc::live();
    if c != Default::default() {
        return Err(format!("{}: counters after run(All): {c:?}", D::NAME));
    }
    let queued = 2 * ((data.refs / KEYS_PER_HEAD) * (KEYS_PER_HEAD + 1) + cfg.heads) as u64;
    let (data, tree_figs) = (figures(&data, &t), figures(&tree_figs, &t));
    if stats.refs != queued {
        return Err(format!("{}: run(All) applied {} refs, {queued} were queued", D::NAME, stats.refs));
    }
    let residue: Live = end.since(base);
    let settled: Live = end2.since(base2);
    // The collector's fixed bookkeeping (see the help text): one queue block.
    let restored = |l: &Live| l.bytes.abs() <= 4096 && l.blocks.abs() <= 1;
    Ok(ImplMem {
        impl_name: D::NAME,
        bytes_per_ref: data.bytes_per_ref,
        bytes_per_head: data.bytes_per_head,
        baseline_restored: restored(&residue),
        baseline_bytes: base.bytes,
        pending_bytes: pending.since(base).bytes,
        extent_tree_bytes: with_tree.since(end).bytes,
        residue_bytes: residue.bytes,
        residue_blocks: residue.blocks,
        residue_by_size: rows(&t.total, 1),
        settled_residue_bytes: settled.bytes,
        settled_residue_blocks: settled.blocks,
        settled_restored: restored(&settled),
        refs_run: stats.refs,
        data,
        tree: tree_figs,
    })
}

struct MemVisitor(MemConfig);

impl ImplVisitor for MemVisitor {
    type Output = Result<ImplMem, String>;

    fn visit<D: DelayedRefs>(self) -> Self::Output {
        measure::<D>(self.0)
    }
}

/// The JSON object `--json` prints.
#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    results: &'a [ImplMem],
    target_bytes_per_ref: f64,
    target_bytes_per_head: f64,
    definitions: &'static str,
}

/// `0.25x96 + 1x48` for the largest contributions.
fn blocks_line(rows: &[SizeRow]) -> String {
    let parts: Vec<String> = rows
        .iter()
        .filter(|r| r.per_unit.abs() >= 0.005)
        .take(6)
        .map(|r| format!("{:.2} x {} B", r.per_unit, r.size))
        .collect();
    if parts.is_empty() { "nothing".into() } else { parts.join(" + ") }
}

/// The human-readable report.
pub fn table(results: &[ImplMem]) -> String {
    let mut out = String::new();
    for line in DEFINITIONS.lines() {
        out.push_str(&format!("# {line}\n"));
    }
    out.push_str(&format!(
        "{:<9} {:<5} {:>9} {:>10} {:>10} {:>11} {:>14} {:>15}\n",
        "impl", "kind", "bytes/ref", "bytes/head", "blocks/ref", "blocks/head", "est_malloc/ref", "est_malloc/head"
    ));
    for r in results {
        for k in [&r.data, &r.tree] {
            out.push_str(&format!(
                "{:<9} {:<5} {:>9.2} {:>10.2} {:>10.2} {:>11.2} {:>14.2} {:>15.2}\n",
                r.impl_name,
                k.kind,
                k.bytes_per_ref,
                k.bytes_per_head,
                k.blocks_per_ref,
                k.blocks_per_head,
                k.est_malloc_bytes_per_ref,
                k.est_malloc_bytes_per_head
            ));
        }
    }
    out.push_str(&format!(
        "{:<9} {:>14} {:>13} {:>17} {:>8} {:>9} {:>16} {:>8}\n",
        "impl",
        "baseline_bytes",
        "pending_bytes",
        "extent_tree_bytes",
        "residue",
        "restored",
        "settled_residue",
        "settled"
    ));
    let yes = |b: bool| if b { "yes" } else { "NO" };
    for r in results {
        out.push_str(&format!(
            "{:<9} {:>14} {:>13} {:>17} {:>8} {:>9} {:>16} {:>8}\n",
            r.impl_name,
            r.baseline_bytes,
            r.pending_bytes,
            r.extent_tree_bytes,
            format!("{}/{}", r.residue_bytes, r.residue_blocks),
            yes(r.baseline_restored),
            format!("{}/{}", r.settled_residue_bytes, r.settled_residue_blocks),
            yes(r.settled_restored)
        ));
    }
    out.push_str("(residue: live bytes/blocks left over against the baseline)\n");
    for r in results {
        for k in [&r.data, &r.tree] {
            out.push_str(&format!(
                "{} {}: one more ref allocates {}\n",
                r.impl_name,
                k.kind,
                blocks_line(&k.ref_blocks)
            ));
            out.push_str(&format!(
                "{} {}: one new head with its ref allocates {}\n",
                r.impl_name,
                k.kind,
                blocks_line(&k.head_with_ref_blocks)
            ));
        }
        if !r.residue_by_size.is_empty() {
            let rows: Vec<String> =
                r.residue_by_size.iter().map(|x| format!("{} x {} B", x.per_unit, x.size)).collect();
            out.push_str(&format!("{}: left over after run(All) + reclaim(): {}\n", r.impl_name, rows.join(" + ")));
        }
        let (d, t) = (&r.data, &r.tree);
        if (d.bytes_per_ref - t.bytes_per_ref).abs() >= 0.5 || (d.bytes_per_head - t.bytes_per_head).abs() >= 0.5 {
            out.push_str(&format!(
                "{}: data and tree refs differ: {:.2} vs {:.2} B per ref, {:.2} vs {:.2} B per head\n",
                r.impl_name, d.bytes_per_ref, t.bytes_per_ref, d.bytes_per_head, t.bytes_per_head
            ));
        }
    }
    out.push_str(&format!(
        "targets: <= {TARGET_REF} B per pending ref, <= {TARGET_HEAD} B per head \
         (the kernel: ~112 B per ref, 128-152 B per head)\n"
    ));
    for r in results {
        out.push_str(&format!(
            "{}: {:.2} B/ref ({}), {:.2} B/head ({}), baseline {}\n",
            r.impl_name,
            r.bytes_per_ref,
            if r.bytes_per_ref <= TARGET_REF { "meets target" } else { "over target" },
            r.bytes_per_head,
            if r.bytes_per_head <= TARGET_HEAD { "meets target" } else { "over target" },
            if r.baseline_restored {
                "restored".to_string()
            } else {
                format!(
                    "NOT restored ({} B in {} blocks left; with a second reclaim() on each side: {})",
                    r.residue_bytes,
                    r.residue_blocks,
                    if r.settled_restored { "restored" } else { "NOT restored" }
                )
            }
        ));
    }
    out
}

/// The JSON object.
pub fn json(results: &[ImplMem]) -> String {
    let report = JsonReport {
        results,
        target_bytes_per_ref: TARGET_REF,
        target_bytes_per_head: TARGET_HEAD,
        definitions: DEFINITIONS,
    };
    serde_json::to_string(&report).expect("report serializes")
}

/// Run `mem` and return the process exit code.
pub fn run(args: &MemArgs) -> i32 {
    if args.refs == 0 || args.heads == 0 {
        eprintln!("mem: --refs and --heads must be at least 1");
        return EXIT_USAGE;
    }
    let cfg = MemConfig { refs: args.refs, heads: args.heads };
    let mut results = Vec::new();
    let mut failed = false;
    for &name in args.impl_choice.names() {
        match impls::with_impl(name, MemVisitor(cfg)) {
            None => {
                eprintln!("mem: {}", impls::unavailable_message(name));
                failed = true;
            }
            Some(Err(e)) => {
                eprintln!("mem: {name}: {e}");
                failed = true;
            }
            Some(Ok(r)) => results.push(r),
        }
    }
    if args.json {
        outln!("{}", json(&results));
    } else {
        out!("{}", table(&results));
    }
    if failed || results.iter().any(|r| !r.baseline_restored) { EXIT_FAIL } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use delayed_refs::ShardedRefs;

    /// Data and tree heads share a shard's head map: together the warm-up's
    /// extents must reach every shard.
    #[test]
    fn warm_up_reaches_every_shard() {
        let refs = ShardedRefs::new(FsConfig::default());
        let mut hit = vec![false; refs.shard_count()];
        for kind in [Kind::Data, Kind::Tree] {
            for i in 0..WARM_EXTENTS {
                hit[refs.shard_of(bytenr_of(5, 2 * i + kind as u64))] = true;
            }
        }
        assert!(hit.iter().all(|&h| h), "{hit:?}");
    }
}
