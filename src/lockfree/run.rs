//! The lock-free run side (semantics.md §6.2-§6.11).
//!
//! # Synchronization
//!
//! - Selection: the cursor `run_start` is a hint (invariant 6, `Relaxed`);
//!   exclusivity comes from `HeadState::try_claim`'s CAS (hazard 2: heads are
//!   claimed in place, never by removing them from the index).
//! - Taking a ref: `compare_exchange(v, 0)` on the node's count from the value
//!   just read; a concurrent merge makes it fail and the runner re-reads, so a
//!   ref whose sign changes while being taken is neither lost nor run twice.
//! - Adds before drops: the add scan walks the head after the claim; an ADD
//!   created after the claim leaves a marker (module `head`). Before each
//!   drop the runner re-reads `add_epoch` (`Acquire`, pairs with the
//!   `Release` bump after the marker insert) and, when it moved, runs the
//!   marked ADDs by key before going on: no rescan of the head.
//! - Readers: `run_seq` is odd from before a take until after the backend
//!   applied it; the take's `AcqRel` RMWs order the odd value before the
//!   `ref_mod` change a reader may observe.
//! - Close: see `state` (close from the exact word read before the final
//!   emptiness check).

#![forbid(unsafe_code)]

use super::count::{self, Transition};
use super::head::{Head, HeadNode};
use super::root::Engine;
use super::state::adders;
use super::store::{HeadEntry, MapEntry, OrderedMap, Stores};
use crate::api::{HeadOutcome, RunMode, RunStats};
use crate::batch::{RunScope, run_batch};
use crate::domain::key::{NodeKey, RefKey, comp_refs};
use crate::domain::kind::Action;
use crate::domain::merge::merge_run;
use crate::error::{Error, Result};
use crate::extent_tree::{ExtentTree, OpRun, Pin, RefRun, call_backend};
use crate::sync::Ordering;

/// An entry of the engine's node map.
type Node<'g, S> = HeadNode<'g, <S as Stores>::Nodes>;

/// A head held by this runner's claim, with its bytenr (the index key: the
/// head does not store it).
struct Claimed<'a> {
    head: &'a Head,
    bytenr: u64,
}

impl std::ops::Deref for Claimed<'_> {
    type Target = Head;

    fn deref(&self) -> &Head {
        self.head
    }
}

/// `btrfs_select_ref_head` (semantics.md §6.2): round-robin from the cursor,
/// claiming in place.
fn select<'g, S: Stores>(refs: &'g Engine<S>, guard: &'g S::Guard) -> Option<HeadEntry<'g, S>> {
    let start = refs.run_start.load(Ordering::Relaxed);
    let scan = |mut e: Option<HeadEntry<'g, S>>, stop: Option<u64>| {
        while let Some(x) = e {
            if stop.is_some_and(|s| *x.key() >= s) {
                break;
            }
            let h = x.value();
            if h.is_closed() {
                x.remove();
            } else if h.try_claim() {
                return Some(x);
            }
            e = x.next();
        }
        None
    };
    let picked = scan(refs.heads.lower_bound(&start, guard), None)
        .or_else(|| if start != 0 { scan(refs.heads.front(guard), Some(start)) } else { None });
    match &picked {
        Some(x) => {
            refs.counters.num_heads_ready.add(-1);
            let h = x.value();
            // Relaxed: the cursor is only a hint (invariant 6).
            refs.run_start.store(x.key().wrapping_add(h.num_bytes()), Ordering::Relaxed);
        }
        None => refs.run_start.store(0, Ordering::Relaxed),
    }
    picked
}

enum Take {
    Nothing,
    Ran,
    HeldBack,
    /// A DROP was found, but an ADD was noted since `late_seen`: run the
    /// late ADDs first.
    LateAdds,
}

/// Take one node's count and run it (semantics.md §6.8 steps 1-9).
#[allow(clippy::too_many_arguments)]
fn take_and_run<S: Stores, B: ExtentTree + ?Sized>(
    refs: &Engine<S>,
    scope: &RunScope<'_, B>,
    guard: &S::Guard,
    head: &Claimed<'_>,
    node: &Node<'_, S>,
    want_add: bool,
    late_seen: Option<u64>,
    stats: &mut RunStats,
) -> Result<Take> {
    let g = *refs.fs.reserves.geometry();
    let key = node.key();
    loop {
        let v = node.peek();
        if v == 0 || (v > 0) != want_add {
            return Ok(Take::Nothing);
        }
        // Drop scan: re-check for late ADDs after reading the DROP. The
        // Acquire load (`add_epoch`) comes after the peek above, which read
        // this count from an adder's AcqRel RMW (or a later one in its
        // release sequence), so an ADD that adder, or any thread before it,
        // noted has its Release bump of add_epoch visible here. Without
        // this, an ADD and then a DROP queued between the caller's look and
        // this take could run DROP first.
        if late_seen.is_some_and(|s| head.add_epoch() != s) {
            return Ok(Take::LateAdds);
        }
        if refs.fs.seq.holds_back(key.seq) {
            return Ok(Take::HeldBack);
        }
        if !head.is_data() && v.unsigned_abs() != 1 {
            return Err(Error::TreeRefMod { bytenr: head.bytenr, key: key.key, ref_mod: v.unsigned_abs() });
        }
        // Readers retry from here until the window drops (docs/protocols.md §f).
        let window = head.open_apply_window();
        if !node.try_take(v) {
            drop(window);
            continue;
        }
        head.take_ref_mod(v);
        refs.counters.num_entries.add(-1);
        // A flag or op set right after these takes stays on the head for
        // the next ref or the leftover-op step.
        let mir = head.take_must_insert();
        let op = head.take_op();
        let action = if v > 0 { Action::Add } else { Action::Drop };
        let num_bytes = head.num_bytes();
        let run = RefRun {
            bytenr: head.bytenr,
            num_bytes,
            is_data: head.is_data(),
            key: key.key,
            level: node.level(),
            action,
            ref_mod: v.unsigned_abs(),
            insert_reserved: mir,
            extent_op: op.as_ref(),
            owning_root: head.owning_root(),
            batch: scope.batch(),
        };
        // A failing or panicking backend: put the ref back; a panic also
        // releases the head here (an error is unselected by `visit`, which
        // the unwinding skips) and goes on to the caller of `run`, so
        // nothing queued is lost and a later run or `destroy` finds the
        // head unclaimed.
        if let Err(failure) = call_backend(|| scope.backend().apply_ref(&run)) {
            restore_taken(refs, guard, head, node, v, mir, op);
            drop(window);
            if failure.is_panic() {
                refs.unselect(head);
            }
            return Err(failure.into_error(head.bytenr));
        }
        // The even value publishes the applied state to readers.
        drop(window);
        crate::trace_ref!(run, head.bytenr, num_bytes, action, key, node.level(), v.unsigned_abs());
        refs.fs.reserves.delayed_refs_rsv_release(1, 0);
        stats.refs += 1;
        stats.bytes_released += g.delayed_ref_bytes(1);
        return Ok(Take::Ran);
    }
}

/// Put back what a failed (or panicked) run of `node` took: its count `v`,
/// the must_insert_reserved flag and the extent op (nothing queued may be
/// lost).
#[allow(clippy::too_many_arguments)]
fn restore_taken<S: Stores>(
    refs: &Engine<S>,
    guard: &S::Guard,
    head: &Claimed<'_>,
    node: &Node<'_, S>,
    v: i64,
    mir: bool,
    op: Option<crate::domain::extent_op::ExtentOp>,
) {
    // Through change_node: an adder may have killed the emptied node
    // meanwhile (re-allocation at another level).
    let (t, unlinked, _) = head.change_node(&refs.nodes, node.key(), v, node.level(), guard);
    if unlinked {
        refs.counters.retired.add(1);
    }
    match t {
        Transition::Created => refs.counters.num_entries.add(1),
        Transition::Merged => {
            refs.fs.reserves.delayed_refs_rsv_release(1, 0);
        }
        Transition::Dropped => {
            refs.counters.num_entries.add(-1);
            refs.fs.reserves.delayed_refs_rsv_release(2, 0);
        }
        Transition::None => {}
    }
    head.restore_ref_mod(v);
    if mir {
        head.restore_must_insert();
    }
    if let Some(op) = op {
        head.restore_op(op);
    }
}

/// What visiting one node did.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Visit {
    Nothing,
    Ran,
    /// Held back by a seq blocker: the head is unselected, stop.
    HeldBack,
    /// Late ADDs were noted: run them, then visit this DROP again.
    LateAdds,
}

impl Visit {
    /// Whether the head was held back (and unselected).
    fn held(self) -> bool {
        self == Visit::HeldBack
    }
}

/// Take and run `n` if it has the wanted sign, then kill it if it reads 0.
/// Unselects the head when it is held back or the backend fails.
#[allow(clippy::too_many_arguments)]
fn visit<S: Stores, B: ExtentTree + ?Sized>(
    refs: &Engine<S>,
    scope: &RunScope<'_, B>,
    guard: &S::Guard,
    head: &Claimed<'_>,
    n: &Node<'_, S>,
    want_add: bool,
    late_seen: Option<u64>,
    stats: &mut RunStats,
) -> Result<Visit> {
    match take_and_run(refs, scope, guard, head, n, want_add, late_seen, stats) {
        Ok(Take::LateAdds) => Ok(Visit::LateAdds),
        Ok(Take::Nothing) => {
            kill_if_zero(refs, n);
            Ok(Visit::Nothing)
        }
        Ok(Take::Ran) => {
            kill_if_zero(refs, n);
            Ok(Visit::Ran)
        }
        Ok(Take::HeldBack) => Ok(hold(refs, head, stats)),
        Err(err) => {
            refs.unselect(head);
            Err(err)
        }
    }
}

/// Run the ADDs that adders marked since `seen` (module `head`, late-ADD
/// markers): one load when nothing was marked. True if the head was held
/// back (and unselected).
fn run_late_adds<'g, S: Stores, B: ExtentTree + ?Sized>(
    refs: &'g Engine<S>,
    scope: &RunScope<'_, B>,
    guard: &'g S::Guard,
    head: &Claimed<'g>,
    seen: &mut u64,
    stats: &mut RunStats,
) -> Result<bool> {
    // After the bump, the marker it follows is in the map (`Head::add_epoch`).
    let epoch = head.add_epoch();
    if epoch == *seen {
        return Ok(false);
    }
    *seen = epoch;
    // Inline nodes have no markers: look at every live one on every move.
    for n in head.head.inline_nodes() {
        if late_add(refs, scope, guard, head, n.key(), Some(&HeadNode::Inline(n)), stats)?.held() {
            return Ok(true);
        }
    }
    for m in head.markers(&refs.nodes, guard).into_iter().flatten() {
        // Consume the notes first, then look at the node: the adder changed
        // the node before noting, so the AcqRel take that reads its note
        // also sees its ADD. A note made after the take keeps the marker
        // alive through the kill below; its adder bumped `add_epoch` after
        // noting, so the next look comes back for it.
        count::take_all(&m.value().count);
        if late_add(refs, scope, guard, head, m.key().key, None, stats)?.held() {
            return Ok(true);
        }
        kill_if_zero(refs, &HeadNode::Map(m));
    }
    Ok(false)
}

/// Run the late ADD at `key`, if it is still there (`node`: the node of
/// `key` if the caller holds it, saving the search for it).
#[allow(clippy::too_many_arguments)]
fn late_add<'g, S: Stores, B: ExtentTree + ?Sized>(
    refs: &'g Engine<S>,
    scope: &RunScope<'_, B>,
    guard: &'g S::Guard,
    head: &Claimed<'g>,
    key: NodeKey,
    node: Option<&Node<'g, S>>,
    stats: &mut RunStats,
) -> Result<Visit> {
    if head.is_data() {
        return match node.cloned().or_else(|| head.head.node(&refs.nodes, key, guard)) {
            Some(n) => visit(refs, scope, guard, head, &n, true, None, stats),
            None => Ok(Visit::Nothing),
        };
    }
    // Metadata: fold the ADD with its identity's other nodes first (a
    // pending DROP of the same backref cancels it), then run the
    // identity's oldest node if it is an ADD (`fold_identity`). An ADD left
    // behind an older DROP that is held back stops the drops, as in the
    // add scan (`visit_scanned`).
    match visit_identity(refs, scope, guard, head, key.key, true, None, stats)? {
        Visit::Nothing if head.head.node(&refs.nodes, key, guard).is_some_and(|n| held_add(refs, &n)) => {
            Ok(hold(refs, head, stats))
        }
        v => Ok(v),
    }
}

/// Kill and unlink a node (or marker) that reads 0, so a head that stays busy does
/// not keep every key it ever saw (module `count`).
fn kill_if_zero<S: Stores>(refs: &Engine<S>, n: &Node<'_, S>) {
    if n.kill_if_zero() {
        refs.counters.retired.add(1);
    }
}

/// Nodes of one backref identity read by a walk, in key order.
type Group<'g, S> = Vec<Node<'g, S>>;

/// The merge pass on a metadata head (semantics.md §5.1), by the claiming runner,
/// at the start of each pass over the head: it folds every identity at
/// once, so a head held back later in the pass is merged below the lowest
/// blocker (invariant 13) and most identities reach the scans as one node.
/// Nodes queued during the pass are folded per identity before any take
/// (`fold_identity`).
fn merge_pass<'g, S: Stores>(refs: &'g Engine<S>, head: &Claimed<'g>, guard: &'g S::Guard) {
    let mut groups: Vec<Group<'g, S>> = Vec::new();
    for n in head.head.nodes(&refs.nodes, guard) {
        if n.peek() != 0 {
            match groups.last_mut() {
                Some(g) if comp_refs(&g[0].key(), &n.key(), false) == std::cmp::Ordering::Equal => g.push(n),
                _ => groups.push(vec![n]),
            }
        }
    }
    fold_groups(refs, head, groups, guard);
}

/// The merge pass of semantics.md §5.1 limited to one backref identity (same
/// `RefKey`, any seq; contiguous in §3.1 order), then that identity's
/// *first* non-zero node: the only one of its nodes the runner may take.
///
/// The kernel merges the whole head under its lock before every ref it
/// selects, so two nodes of one tree backref below the seq barrier never
/// both reach the run. Here adders keep queueing while the runner walks,
/// so the fold is done per identity right before a take, and the take is
/// restricted to the oldest pending node of that identity. An op changes
/// only the node of the seq it read; the ops of one backref are serialized
/// by their callers, so their seqs never decrease, except ops of roots that
/// are not fs trees, which carry seq 0 and land in the identity's first
/// node, which every fold includes. So every pending op older than the
/// first non-zero node is already folded or run: taking that node takes a
/// time-ordered prefix of the identity's pending ops, and a backref toggled
/// ADD/DROP/ADD/... can never reach the run as one node with ref_mod ≥ 2
/// (§10 invariant on tree refs, `Error::TreeRefMod`). The argument, with
/// its state table, is in docs/protocols.md §c, "Metadata heads".
/// Later nodes of the identity wait: a later ADD is either folded by the
/// next call or noted as a late ADD (module `head`), which calls this again.
///
fn fold_identity<'g, S: Stores>(
    refs: &'g Engine<S>,
    head: &Claimed<'g>,
    key: RefKey,
    guard: &'g S::Guard,
) -> Option<Node<'g, S>> {
    let live = |n: &Node<'_, S>| n.peek() != 0;
    let mut it = head.head.identity_nodes(&refs.nodes, key, guard).filter(live);
    let first = it.next()?;
    let Some(second) = it.next() else { return Some(first) };
    let g: Group<'_, S> = [first, second].into_iter().chain(it).collect();
    fold_groups(refs, head, vec![g], guard);
    head.head.identity_nodes(&refs.nodes, key, guard).find(live)
}

/// Visit a metadata head's backref identity `key`: fold it, then take and
/// run its first non-zero node if that has the wanted sign (`fold_identity`).
#[allow(clippy::too_many_arguments)]
fn visit_identity<'g, S: Stores, B: ExtentTree + ?Sized>(
    refs: &'g Engine<S>,
    scope: &RunScope<'_, B>,
    guard: &'g S::Guard,
    head: &Claimed<'g>,
    key: RefKey,
    want_add: bool,
    late_seen: Option<u64>,
    stats: &mut RunStats,
) -> Result<Visit> {
    match fold_identity(refs, head, key, guard) {
        Some(n) => visit(refs, scope, guard, head, &n, want_add, late_seen, stats),
        None => Ok(Visit::Nothing),
    }
}

/// Visit one node met by a scan: a data node directly, a metadata node
/// through its identity (`visit_identity`), once per identity per scan
/// (`last` holds the identity visited last; later nodes of it are only
/// checked for a held ADD and killed if zero).
#[allow(clippy::too_many_arguments)]
fn visit_scanned<'g, S: Stores, B: ExtentTree + ?Sized>(
    refs: &'g Engine<S>,
    scope: &RunScope<'_, B>,
    guard: &'g S::Guard,
    head: &Claimed<'g>,
    n: &Node<'g, S>,
    want_add: bool,
    late_seen: Option<u64>,
    last: &mut Option<RefKey>,
    stats: &mut RunStats,
) -> Result<Visit> {
    if head.is_data() {
        return visit(refs, scope, guard, head, n, want_add, late_seen, stats);
    }
    let key = n.key().key;
    let seen = last.is_some_and(|l| l.cmp_identity(&key) == std::cmp::Ordering::Equal);
    if !seen && n.peek() != 0 {
        let v = visit_identity(refs, scope, guard, head, key, want_add, late_seen, stats)?;
        if v == Visit::LateAdds {
            return Ok(v);
        }
        *last = Some(key);
        if v != Visit::Nothing {
            return Ok(v);
        }
    }
    // `n` is zero, or waits behind an older node of its identity. A held
    // ADD among those still stops the add scan: the kernel's add list
    // would select it before any drop and unselect the head (§3.3, §5.2).
    if want_add && held_add(refs, n) {
        return Ok(hold(refs, head, stats));
    }
    kill_if_zero(refs, n);
    Ok(Visit::Nothing)
}

/// Whether `n` is a pending ADD that the seq barrier holds back.
fn held_add<S: Stores>(refs: &Engine<S>, n: &Node<'_, S>) -> bool {
    n.peek() > 0 && refs.fs.seq.holds_back(n.key().seq)
}

/// Unselect a head held back by a seq blocker (semantics.md §6.9).
fn hold<S: Stores>(refs: &Engine<S>, head: &Claimed<'_>, stats: &mut RunStats) -> Visit {
    refs.unselect(head);
    stats.held_back += 1;
    Visit::HeldBack
}

/// Fold each group of same-identity nodes (read by a walk) into one node.
fn fold_groups<S: Stores>(refs: &Engine<S>, head: &Claimed<'_>, mut groups: Vec<Group<'_, S>>, guard: &S::Guard) {
    // The seq barrier is read after the walk (semantics.md §5.2): a blocker that
    // registered during the walk holds back every node added after it, and
    // those nodes carry a seq at or above its own, so they are filtered here.
    let seq = refs.fs.seq.lowest_seq();
    if seq != 0 {
        for g in &mut groups {
            g.retain(|n| n.key().seq < seq);
        }
    }
    for g in groups.into_iter().filter(|g| g.len() >= 2) {
        let signed: Vec<i64> = g.iter().map(|n| n.peek()).collect();
        // Everything cancelling (None) folds into the first node, which then drops.
        let s = merge_run(&signed).map_or(0, |(s, _)| s);
        let mut moved = 0i64;
        for (i, n) in g.iter().enumerate() {
            if i == s {
                continue;
            }
            let t = n.take_all();
            if t != 0 {
                moved += t;
                refs.counters.num_entries.add(-1);
                refs.fs.reserves.delayed_refs_rsv_release(1, 0);
            }
        }
        let survivor = &g[s];
        let (t, unlinked, _) = head.change_node(&refs.nodes, survivor.key(), moved, survivor.level(), guard);
        if unlinked {
            refs.counters.retired.add(1);
        }
        match t {
            Transition::Created => {
                refs.counters.num_entries.add(1);
                refs.fs.reserves.grow_delayed_refs(refs.fs.reserves.geometry().delayed_ref_bytes(1), 0);
            }
            Transition::Dropped => {
                refs.counters.num_entries.add(-1);
                refs.fs.reserves.delayed_refs_rsv_release(1, 0);
            }
            Transition::Merged | Transition::None => {}
        }
    }
}

/// Run a claimed head to the end (semantics.md §6.8, §6.11).
fn run_head<S: Stores, B: ExtentTree + ?Sized>(
    refs: &Engine<S>,
    scope: &RunScope<'_, B>,
    entry: &HeadEntry<'_, S>,
    guard: &S::Guard,
) -> Result<(HeadOutcome, RunStats)> {
    let head = &Claimed { head: entry.value(), bytenr: *entry.key() };
    let mut stats = RunStats { heads: 1, ..RunStats::default() };
    'outer: loop {
        if !head.is_data() {
            merge_pass(refs, head, guard);
        }
        // Markers noted before this load name ADDs the add scan below finds anyway; the
        // first look (before the drop scan's first node, or after the scan
        // if the range is empty) drains them as no-ops.
        // An epoch of 0 means no adder ever noted on this head (every note
        // is followed by a bump), so there is nothing stale to drain and the
        // first look costs one load, not a search (W2-style drains).
        let epoch = head.add_epoch();
        let mut seen = if epoch == 0 { 0 } else { epoch.wrapping_sub(1) };
        // Add scan: every ADD whose adder left before the claim (or before
        // this pass) is in the range; later ones are marked.
        let mut last = None;
        for n in head.head.nodes(&refs.nodes, guard) {
            if visit_scanned(refs, scope, guard, head, &n, true, None, &mut last, &mut stats)?.held() {
                return Ok((HeadOutcome::HeldBack, stats));
            }
        }
        // Drop scan: before each drop, the ADDs marked since the last look.
        let mut last = None;
        for n in head.head.nodes(&refs.nodes, guard) {
            loop {
                if run_late_adds(refs, scope, guard, head, &mut seen, &mut stats)? {
                    return Ok((HeadOutcome::HeldBack, stats));
                }
                match visit_scanned(refs, scope, guard, head, &n, false, Some(seen), &mut last, &mut stats)? {
                    Visit::LateAdds => continue,
                    v if v.held() => return Ok((HeadOutcome::HeldBack, stats)),
                    _ => break,
                }
            }
        }
        if run_late_adds(refs, scope, guard, head, &mut seen, &mut stats)? {
            return Ok((HeadOutcome::HeldBack, stats));
        }
        // No second pass just because this one ran something: like the
        // kernel's cleanup of a head, go on to the leftover op and the close,
        // whose emptiness check (after `w0`) starts another pass if refs
        // were queued meanwhile.
        // §6.11 step 1: a leftover extent op.
        // An op on a head with must_insert_reserved is discarded only once the
        // head is retired (below): an adder may still be publishing the ref
        // that will insert the item with this op (§6.10).
        if head.has_pending_op() {
            // The op leaves the head before it is on disk: readers retry
            // (same seqlock window as a taken ref, §7.1).
            let window = head.open_apply_window();
            let op = head.take_op();
            if op.is_none() || head.must_insert_reserved() {
                if let Some(op) = op {
                    head.restore_op(op);
                }
                drop(window);
                continue;
            }
            let Some(op) = op else { continue };
            let op_run = OpRun {
                bytenr: head.bytenr,
                num_bytes: head.num_bytes(),
                is_data: head.is_data(),
                op: &op,
                batch: scope.batch(),
            };
            let apply = || scope.backend().apply_extent_op(&op_run);
            if let Err(failure) = call_backend(apply) {
                // As a failed `apply_ref`: the op goes back, the head is
                // released, a panic goes on to the caller.
                head.restore_op(op);
                drop(window);
                refs.unselect(head);
                return Err(failure.into_error(head.bytenr));
            }
            // The even value publishes the applied op.
            drop(window);
            stats.extent_ops += 1;
            continue;
        }
        // Step 2: close from the word read before the emptiness re-check.
        let w0 = head.word();
        if adders(w0) != 0 {
            crate::sync::spin_hint();
            continue;
        }
        if head.has_refs(&refs.nodes, guard) || head.has_pending_op() {
            continue;
        }
        let Some((mir, released)) = refs.retire(entry, w0, guard) else { continue 'outer };
        // Closed: no adder can come back; a cancelled allocation's op goes.
        head.take_op();
        if mir {
            // Step 4: the allocation was cancelled in this transaction. The
            // head is gone: a failed pin cannot be put back (Error::PinLost).
            let pin =
                Pin { bytenr: head.bytenr, num_bytes: head.num_bytes(), is_data: head.is_data(), batch: scope.batch() };
            if let Err(failure) = call_backend(|| scope.backend().pin_reserved(&pin)) {
                return Err(failure.into_pin_error(&pin));
            }
        }
        stats.bytes_released += released;
        stats.heads_deleted += 1;
        crate::trace_head!(run, head.bytenr, head.num_bytes(), crate::Action::Add, head.is_data());
        return Ok((HeadOutcome::Deleted, stats));
    }
}

/// Select and run one head, inside `scope`'s hooks.
fn run_one_in<S: Stores, B: ExtentTree + ?Sized>(
    refs: &Engine<S>,
    scope: &RunScope<'_, B>,
) -> Result<Option<(u64, HeadOutcome, RunStats)>> {
    let guard = refs.pin();
    let Some(entry) = select(refs, &guard) else { return Ok(None) };
    let bytenr = *entry.key();
    let release = || refs.unselect(entry.value());
    let (outcome, stats) = scope.head(bytenr, release, || run_head(refs, scope, &entry, &guard))?;
    Ok(Some((bytenr, outcome, stats)))
}

/// Select and run one head, as one run batch.
pub(super) fn run_one<S: Stores, B: ExtentTree + ?Sized>(
    refs: &Engine<S>,
    backend: &B,
) -> Result<Option<(u64, HeadOutcome, RunStats)>> {
    run_batch(backend, refs.batches.next(), |scope| run_one_in(refs, scope))
}

/// `btrfs_run_delayed_refs` (semantics.md §6.5), as one run batch.
pub(super) fn run<S: Stores, B: ExtentTree + ?Sized>(refs: &Engine<S>, backend: &B, mode: RunMode) -> Result<RunStats> {
    let ready = if mode == RunMode::Ready { refs.counters.num_heads_ready.sum().max(0) as u64 } else { 0 };
    run_batch(backend, refs.batches.next(), |scope| {
        crate::api::drive_run(mode, ready, || Ok(run_one_in(refs, scope)?.map(|(_, _, s)| s)), || refs.heads.is_empty())
    })
}
