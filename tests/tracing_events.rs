//! The `tracing` feature's events (src/trace.rs): one add and one run of a
//! tree ref and a data ref emit the kernel-named events with their fields,
//! from both implementations. Run with `cargo test --features tracing --test tracing_events`.
#![cfg(feature = "tracing")]

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;

use delayed_refs::{Action, DelayedRefs, FsConfig, GenericRef, MemExtentTree, RunMode, TransHandle};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// A subscriber that records every event as (name, fields).
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<(String, BTreeMap<String, String>)>>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_string(), format!("{value:?}"));
    }
}

impl Subscriber for &'static Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, e: &Event<'_>) {
        let mut f = BTreeMap::new();
        e.record(&mut Fields(&mut f));
        self.events.lock().unwrap().push((e.metadata().name().to_string(), f));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

fn events<D: DelayedRefs>() {
    let rec: &'static Recorder = Box::leak(Box::default());
    tracing::subscriber::with_default(rec, || {
        let refs = D::new(FsConfig::default());
        let tree = MemExtentTree::new();
        let mut h = TransHandle::new();
        let t = GenericRef::new(Action::AddExtent, 1 << 20, 16384, 0, 5).tree(1, 5, 5, false);
        refs.add_tree_ref(&mut h, &t, None).unwrap();
        let d = GenericRef::new(Action::AddExtent, 2 << 20, 4096, 0, 5).data(5, 257, 8192, 0, false);
        refs.add_data_ref(&mut h, &d, 4096).unwrap();
        refs.run(&tree, RunMode::All).unwrap();
    });
    let ev = rec.events.lock().unwrap();
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "add_delayed_ref_head",
        "add_delayed_tree_ref",
        "add_delayed_data_ref",
        "run_delayed_tree_ref",
        "run_delayed_data_ref",
        "run_delayed_ref_head",
    ] {
        assert!(names.contains(&want), "{} emitted no {want}: {names:?}", D::NAME);
    }
    assert_eq!(names.iter().filter(|n| **n == "run_delayed_ref_head").count(), 2, "{names:?}");
    let (_, data) = ev.iter().find(|(n, _)| n == "add_delayed_data_ref").unwrap();
    assert_eq!(data["bytenr"], (2u64 << 20).to_string());
    assert_eq!(data["num_bytes"], "4096");
    assert_eq!(data["action"], "\"ADD_DELAYED_EXTENT\"");
    assert_eq!(data["ref_root"], "5");
    assert_eq!(data["owner"], "257");
    assert_eq!(data["offset"], "8192");
    assert_eq!(data["parent"], "0");
    assert_eq!(data["type"], "178", "EXTENT_DATA_REF_KEY");
    let (_, tree) = ev.iter().find(|(n, _)| n == "run_delayed_tree_ref").unwrap();
    assert_eq!(tree["level"], "1");
    assert_eq!(tree["ref_mod"], "1");
    assert_eq!(tree["type"], "176", "TREE_BLOCK_REF_KEY");
}

for_each_impl!(events);
