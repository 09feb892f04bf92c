#!/usr/bin/env python3
"""Run the mutations of the backend-contract tests (docs/backend.md,
tests/backend_errors.rs).

Usage: scripts/backend_mutations.py WORKTREE B1 [B2 ...]   (or ALL)
WORKTREE must be a separate, clean git worktree (`git worktree add ../mut
HEAD --detach`): for each mutation the script resets it (`git checkout --
.`), applies one edit, runs the tests it names there (debug build, 300 s
timeout: a mutation that makes a run spin counts as caught), and prints
whether they failed.
"""
import os
import subprocess
import sys
import time

if len(sys.argv) < 3:
    sys.exit(__doc__)
W = os.path.abspath(sys.argv[1])


def edit(path, a, b):
    p = os.path.join(W, path)
    s = open(p).read()
    assert s.count(a) == 1, (path, a[:60], s.count(a))
    open(p, 'w').write(s.replace(a, b))


# Each: (what it breaks, edit, test target, filter).
MUTS = {
    # A failed begin hook forgets to release the claimed head.
    'B1': ('begin hook failure keeps the head claimed',
           lambda: edit('src/batch.rs', '''        if let Err((hook, failure)) = begin() {
            release();''', '''        if let Err((hook, failure)) = begin() {
            let _ = release;'''),
           'backend_errors', 'begin_hook_errors'),
    # The lock-free run drops the ref a failing apply_ref was given.
    'B2': ('lock-free: a failed apply_ref loses its ref',
           lambda: edit('src/lockfree/run.rs', '''        if let Err(failure) = call_backend(|| scope.backend().apply_ref(&run)) {
            restore_taken(refs, guard, head, node, v, mir, op);''', '''        if let Err(failure) = call_backend(|| scope.backend().apply_ref(&run)) {
            let _ = (mir, op);'''),
           'backend_errors', 'lockfree::storage_error_in_apply_ref'),
    # A run that failed never closes its batch.
    'B3': ('end_run not called after an error',
           lambda: edit('src/batch.rs', '''        Ok(Err(e)) => {
            scope.end(BatchEnd::Failed)?;
            Err(e)
        }''', '''        Ok(Err(e)) => Err(e),'''),
           'backend_errors', 'storage_error_in_apply_ref'),
    # A storage error classified as needing an abort.
    'B4': ('storage error not retryable',
           lambda: edit('src/error.rs', '''            Error::Backend { source, .. } if source.is_storage() => Recovery::Retry,''', ''),
           'backend_errors', 'storage_error_in_apply_ref'),
    # begin_run called eagerly, for runs that find nothing.
    'B5': ('begin_run on an empty run',
           lambda: edit('src/batch.rs', '''    let scope = RunScope { backend, batch, begun: Cell::new(false) };''', '''    let scope = RunScope { backend, batch, begun: Cell::new(false) };
    let _ = backend.begin_run(batch);
    scope.begun.set(true);'''),
           'backend_errors', 'hooks_bracket_runs_and_heads'),
    # The locked port ignores a failed pin.
    'B6': ('locked: pin failure ignored',
           lambda: edit('src/locked/run.rs', '''            if let Err(failure) = call_backend(|| scope.backend().pin_reserved(&pin)) {
                return Err(failure.into_pin_error(&pin));
            }''', '''            let _ = call_backend(|| scope.backend().pin_reserved(&pin));'''),
           'backend_errors', 'locked::pin_failures'),
    # A panicking head body skips end_head(Panicked).
    'B7': ('end_head not told of a panic',
           lambda: edit('src/batch.rs', '''                let _ = call_backend(|| backend.end_head(batch, bytenr, BatchEnd::Panicked));''', ''),
           'backend_errors', 'panics_in_every_hook'),
    # Fault schedule strictly periodic: resonates with a run's calls.
    'B8': ('periodic fault schedule',
           lambda: edit('src/extent_tree/faults.rs', '''        let draw = |salt: u64, one_in: u64| one_in > 0 && splitmix64(call ^ c.seed ^ salt) % one_in == 0;''',
                        '''        let draw = |salt: u64, one_in: u64| one_in > 0 && (call + (salt & 1)) % one_in == 0;'''),
           '--lib', 'schedule_is_seeded_and_about_one_in_n'),
    # The sharded peer's lookup swallows a backend error.
    'B9': ('lookup error swallowed (locked)',
           lambda: edit('src/locked/mod.rs', '''        let disk_of = |b: u64| backend.lookup(b).map_err(|source| Error::Backend { bytenr: b, source });''',
                        '''        let disk_of = |b: u64| -> Result<Option<ExtentInfo>> { Ok(backend.lookup(b).unwrap_or(None)) };'''),
           'backend_errors', 'locked::lookup_error'),
    # Backpressure never says Throttle.
    'B10': ('backpressure never throttles',
            lambda: edit('src/api.rs', 'if over_limit || fs.reserves.check_space_for_delayed_refs() {',
                         'if false && (over_limit || fs.reserves.check_space_for_delayed_refs()) {'),
            '--doc', 'backpressure'),
}

names = list(MUTS) if sys.argv[2:] == ['ALL'] else sys.argv[2:]
env = dict(os.environ, CARGO_TARGET_DIR=W + '/target/mut')
for name in names:
    what, f, target, filt = MUTS[name]
    subprocess.run(['git', 'checkout', '--', '.'], cwd=W, check=True)
    f()
    sel = [target] if target.startswith('--') else ['--test', target]
    t = time.time()
    r = subprocess.run(['timeout', '300', 'cargo', 'test', '-q'] + sel + ['--', filt], cwd=W, env=env,
                       capture_output=True, text=True)
    out = r.stdout + r.stderr
    if 'error[' in out and 'test result' not in out:
        print(name, 'BUILD FAILED', out[-1500:], flush=True)
        continue
    caught = r.returncode != 0
    msg = [l.strip() for l in out.splitlines() if 'panicked' in l or 'assertion' in l][:2]
    verdict = ('TIMEOUT (caught: the run spins)' if r.returncode == 124 else 'FAILED (mutation caught)') if caught \
        else 'PASSED (mutation survived)'
    print(name, what, '|', target, filt, '|', verdict, '%.0f s' % (time.time() - t), msg, flush=True)
subprocess.run(['git', 'checkout', '--', '.'], cwd=W, check=True)
