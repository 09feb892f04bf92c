//! Progress bars on stderr, one per phase; hidden for `--json` or when stderr
//! is not a terminal.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a timed phase redraws its bar.
const TICK: Duration = Duration::from_millis(50);

/// Whether and how progress is shown.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    enabled: bool,
}

impl Progress {
    /// Shown unless `json` or stderr is not a terminal.
    pub fn new(json: bool) -> Self {
        Progress { enabled: !json && std::io::stderr().is_terminal() }
    }

    /// Whether bars are drawn.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// A bar for a phase of about `length` (in milliseconds of wall time).
    pub fn phase(&self, label: &str, length: Duration) -> ProgressBar {
        if !self.enabled {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(Some(length.as_millis() as u64), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{prefix:32} [{bar:30}] {elapsed:>4} {msg}")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        pb.set_style(style);
        pb.set_prefix(label.to_string());
        pb
    }
}

/// Sleep until `length` has passed since `start`, moving `bar` along.
pub fn tick_until(bar: &ProgressBar, start: Instant, length: Duration) {
    loop {
        let e = start.elapsed();
        if e >= length {
            break;
        }
        bar.set_position(e.as_millis() as u64);
        std::thread::sleep((length - e).min(TICK));
    }
    bar.set_position(length.as_millis() as u64);
}
