//! Writing results to stdout, and printing an error with its causes.
//!
//! `println!` panics when stdout is a closed pipe (`... | head`); `outln!`
//! and `out!` (through [`text`]) end the process quietly with exit code 0 instead, since
//! whoever closed the pipe has read all it wanted. Other write errors end it
//! with exit code 1 and one message.

use std::fmt;
use std::io::{self, Write};

/// Print a line on stdout (like `println!`).
macro_rules! outln {
    () => { $crate::out::text(format_args!("\n")) };
    ($($t:tt)*) => { $crate::out::text(format_args!("{}\n", format_args!($($t)*))) };
}

/// Print on stdout (like `print!`).
macro_rules! out {
    ($($t:tt)*) => { $crate::out::text(format_args!($($t)*)) };
}

/// Write to stdout; a closed pipe ends the process with exit code 0.
pub fn text(args: fmt::Arguments<'_>) {
    let mut stdout = io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("delayed-refs-stress: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// An error and each of its causes once, joined by `: `.
///
/// Errors whose message already contains their cause would print it twice
/// with this; the crate's errors leave the cause to `source()`.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;
    use delayed_refs::{Error, ExtentError};

    #[test]
    fn backend_error_prints_its_cause_once() {
        let e = Error::Backend { bytenr: 4096, source: ExtentError::MissingExtent { bytenr: 4096 } };
        let s = Chain(&e).to_string();
        assert_eq!(s, "the extent-tree backend refused a ref of extent 4096: extent 4096 has no extent item");
        assert_eq!(s.matches("no extent item").count(), 1);
    }
}
