//! Runs `delayed-refs-stress mem --json` at two sizes and checks the report:
//! the contract fields, positive figures, an exit code that follows
//! `baseline_restored`, the locked port back at its baseline exactly, every
//! implementation back at its baseline after a second `reclaim()` on each
//! side, and left-over bytes that do not grow with the work done.

use std::process::Command;

use serde_json::Value;

/// Run `mem --json` with `args`; returns the exit code and the parsed report.
fn mem(args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_delayed-refs-stress"))
        .arg("mem")
        .arg("--json")
        .args(args)
        .output()
        .expect("the stress binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("stdout is one JSON object ({e}):\n{stdout}\n--- stderr\n{}", String::from_utf8_lossy(&out.stderr))
    });
    (out.status.code().unwrap_or(-1), v)
}

fn result<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["results"].as_array().expect("results").iter().find(|r| r["impl"] == name).unwrap_or_else(|| panic!("{name}"))
}

#[test]
fn mem_json_reports_both_implementations() {
    let (code, small) = mem(&["--refs", "400", "--heads", "100"]);
    let (_, large) = mem(&["--refs", "20000", "--heads", "5000"]);
    let results = small["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{small}");
    let all_restored = results.iter().all(|r| r["baseline_restored"] == true);
    assert_eq!(code, if all_restored { 0 } else { 1 }, "{small}");
    for name in ["locked", "lockfree"] {
        let (s, l) = (result(&small, name), result(&large, name));
        for k in ["bytes_per_ref", "bytes_per_head"] {
            let x = s[k].as_f64().unwrap_or_else(|| panic!("{name} {k}: {s}"));
            assert!(x > 0.0, "{name} {k} = {x}");
        }
        assert!(s["baseline_restored"].is_boolean(), "{s}");
        assert!(s["data"]["bytes_per_ref"].is_f64() && s["tree"]["bytes_per_head"].is_f64(), "{s}");
        assert_eq!(s["settled_restored"], true, "{name}: not back at the baseline after two reclaim() calls: {s}");
        let (rs, rl) = (s["residue_bytes"].as_i64().unwrap(), l["residue_bytes"].as_i64().unwrap());
        assert!(rl <= rs.max(0) + (64 << 10), "{name}: left-over bytes grow with the work: {rs} -> {rl}");
    }
    assert_eq!(result(&small, "locked")["baseline_restored"], true, "{small}");
}
