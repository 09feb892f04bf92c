#!/usr/bin/env python3
"""Run the loom mutations of docs/protocols.md ("What is model checked").

Usage: scripts/loom_mutations.py WORKTREE M1 [M2 ...]
WORKTREE must be a separate, clean git worktree (`git worktree add ../mut
HEAD --detach`): for each mutation the script resets it (`git checkout --
.`), applies one edit, builds the loom test binary there, runs the one
model the mutation must break, and prints whether the model failed.
"""
import os
import subprocess
import sys
import time

if len(sys.argv) < 3:
    sys.exit(__doc__)
W = os.path.abspath(sys.argv[1])
def edit(path, a, b):
    p=os.path.join(W,path); s=open(p).read()
    assert s.count(a)==1, (path, a[:60], s.count(a)); open(p,'w').write(s.replace(a,b))
def m1():
    edit('src/lockfree/root.rs','Some((key, inline)) => head.exit_noting_late_add(&self.nodes, key, inline, guard),','Some(_) => head.exit(),')
def m2():
    edit('src/lockfree/root.rs','if !index::retire(entry, w0) {','if !index::retire(entry, head.word()) {')
def m3():
    edit('src/lockfree/root.rs','if s1 != s2 || head.is_closed() {','if s1 != s2 {')
def m4():
    edit('src/lockfree/root.rs','''        let w0 = head.word();
        if busy(head) {
            self.unselect(head);
            return CleanupOutcome::Busy;
        }
        let op = head.take_op();''','''        if busy(head) {
            self.unselect(head);
            return CleanupOutcome::Busy;
        }
        let w0 = head.word();
        let op = head.take_op();''')
def m5():
    edit('src/lockfree/run.rs','''    let mut groups: Vec<Group<'g, S>> = Vec::new();
    for n in head.head.nodes(&refs.nodes, guard) {''','''    let early = refs.fs.seq.lowest_seq();
    let mut groups: Vec<Group<'g, S>> = Vec::new();
    for n in head.head.nodes(&refs.nodes, guard) {''')
    edit('src/lockfree/run.rs','''    fold_groups(refs, head, groups, guard);
}''','''    fold_groups_at(refs, head, groups, guard, Some(early));
}''')
    edit('src/lockfree/run.rs','''fn fold_groups<S: Stores>(refs: &Engine<S>, head: &Claimed<'_>, mut groups: Vec<Group<'_, S>>, guard: &S::Guard) {''','''fn fold_groups<S: Stores>(refs: &Engine<S>, head: &Claimed<'_>, groups: Vec<Group<'_, S>>, guard: &S::Guard) {
    fold_groups_at(refs, head, groups, guard, None)
}
fn fold_groups_at<S: Stores>(refs: &Engine<S>, head: &Claimed<'_>, mut groups: Vec<Group<'_, S>>, guard: &S::Guard, early: Option<u64>) {''')
    edit('src/lockfree/run.rs','''    let seq = refs.fs.seq.lowest_seq();
    if seq != 0 {''','''    let seq = early.unwrap_or_else(|| refs.fs.seq.lowest_seq());
    if seq != 0 {''')
def m6():
    edit('src/lockfree/inline.rs','''            if self
                .members
                .compare_exchange(m, (m | bit(n.i)) + VERSION_ONE, Ordering::AcqRel, Ordering::Acquire)''','''            let fresh = self.members();
            if self
                .members
                .compare_exchange(fresh, (fresh | bit(n.i)) + VERSION_ONE, Ordering::AcqRel, Ordering::Acquire)''')
def m7():
    edit('src/lockfree/inline.rs','''        if self.word().compare_exchange(from, to, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return false;
        }''','''        let _ = from;
        if self.peek() != 0 {
            return false;
        }
        self.word().store(to, Ordering::Release);''')
MUTS={'M1':(m1,'loom_engine_adds_before_drops',3),'M2':(m2,'loom_engine_add_vs_retire',3),'M3':(m3,'loom_engine_reader_vs_runner_vs_retire',3),
      'M4':(m4,'loom_engine_cleanup_vs_adder',3),'M5':(m5,'loom_engine_blocker_vs_merge_pass',3),'M6':(m6,'loom_engine_inline_same_new_key',2),'M7':(m7,'loom_engine_inline_reclaim_vs_readd',2)}
env=dict(os.environ, RUSTFLAGS='--cfg dref_loom -C debug-assertions', CARGO_TARGET_DIR=W+'/target/loom')
for name in sys.argv[2:]:
    f, model, bound = MUTS[name]
    subprocess.run(['git','checkout','--','.'], cwd=W, check=True)
    f()
    b=subprocess.run(['cargo','test','--release','--lib','--no-run'], cwd=W, env=env, capture_output=True, text=True)
    exe=[l.split('(')[1].rstrip(')') for l in b.stderr.splitlines() if 'Executable' in l]
    if b.returncode!=0 or not exe:
        print(name, 'BUILD FAILED', b.stderr[-2000:], flush=True); continue
    t=time.time()
    r=subprocess.run(['timeout','900',os.path.join(W,exe[0]),'--exact','loom_models::'+model,'--test-threads=1'], cwd=W, env=dict(env, DREF_LOOM_ENGINE_PREEMPTIONS=str(bound)), capture_output=True, text=True)
    out=r.stdout+r.stderr
    failed = 'test result: FAILED' in out or 'panicked' in out
    msg=[l for l in out.splitlines() if 'panicked' in l or 'assert' in l.lower()][:2]
    print(name, model, 'bound', bound, 'FAILED (mutation caught)' if failed else ('TIMEOUT' if r.returncode==124 else 'PASSED (mutation survived)'), '%.0f s'%(time.time()-t), msg, flush=True)
subprocess.run(['git','checkout','--','.'], cwd=W, check=True)
