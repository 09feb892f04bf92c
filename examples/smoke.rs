//! Smoke run of the locked port.
use delayed_refs::*;
fn main() {
    let refs = LockedRefs::new(FsConfig::default());
    let tree = MemExtentTree::new();
    let mut h = TransHandle::new();
    for i in 0..100u64 {
        let b = (i + 1) << 20;
        refs.add_data_ref(&mut h, &GenericRef::new(Action::AddExtent, b, 4096, 0, 5).data(5, 257, i, 0, false), 4096).unwrap();
        refs.add_data_ref(&mut h, &GenericRef::new(Action::Add, b, 4096, 0, 5).data(5, 258, i, 0, false), 0).unwrap();
        refs.add_data_ref(&mut h, &GenericRef::new(Action::Drop, b, 4096, 0, 5).data(5, 258, i, 0, false), 0).unwrap();
        refs.add_tree_ref(&mut h, &GenericRef::new(Action::AddExtent, b + 4096, 16384, 0, 5).tree(0, 5, 0, false), Some(ExtentOp::set_flags(0, 0))).unwrap();
    }
    println!("{:?} {:?}", refs.counters(), refs.fs().reserves.snapshot().delayed_refs);
    let s = refs.run(&tree, RunMode::All).unwrap();
    println!("{s:?} {:?} {:?} items={}", refs.counters(), refs.fs().reserves.snapshot().delayed_refs, tree.len());
}
