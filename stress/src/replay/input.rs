//! Reading gzip-compressed line files, with errors that name the file and
//! the line.

#![forbid(unsafe_code)]

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

/// Unreadable or malformed input: which file, which line (1-based; 0 when the
/// problem is not tied to a line) and what is wrong. The replay exits with
/// status 2 on one of these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputError {
    /// The file.
    pub file: PathBuf,
    /// The 1-based line, or 0 for the file as a whole.
    pub line: usize,
    /// What is wrong.
    pub msg: String,
}

impl InputError {
    /// An error about `file` as a whole.
    pub fn file(file: &Path, msg: impl Into<String>) -> Self {
        InputError { file: file.to_path_buf(), line: 0, msg: msg.into() }
    }

    /// An error at one line of `file`.
    pub fn at(file: &Path, line: usize, msg: impl Into<String>) -> Self {
        InputError { file: file.to_path_buf(), line, msg: msg.into() }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.msg)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.msg)
        }
    }
}

impl std::error::Error for InputError {}

/// Call `each(line_number, line)` for every line of the gzip file at `path`
/// (without its line terminator). A read error (truncated or corrupt gzip,
/// invalid UTF-8) and any error `each` returns become an [`InputError`] at
/// that line. An empty file (not even a gzip header) is an error too.
pub fn for_each_gz_line(
    path: &Path,
    mut each: impl FnMut(usize, &str) -> Result<(), String>,
) -> Result<(), InputError> {
    let file = File::open(path).map_err(|e| InputError::file(path, format!("cannot open: {e}")))?;
    let meta = file.metadata().map_err(|e| InputError::file(path, format!("cannot stat: {e}")))?;
    if meta.len() == 0 {
        return Err(InputError::file(path, "empty file (not gzip)"));
    }
    let mut reader = BufReader::new(MultiGzDecoder::new(BufReader::new(file)));
    let mut buf = String::new();
    let mut lineno = 0usize;
    loop {
        buf.clear();
        lineno += 1;
        match reader.read_line(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                let line = buf.strip_suffix('\n').unwrap_or(&buf);
                let line = line.strip_suffix('\r').unwrap_or(line);
                each(lineno, line).map_err(|m| InputError::at(path, lineno, m))?;
            }
            Err(e) => {
                return Err(InputError::at(path, lineno, format!("read error (truncated or corrupt gzip?): {e}")));
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::io::Write;

    /// Gzip `text`.
    pub(crate) fn gz(text: &str) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(text.as_bytes()).unwrap();
        e.finish().unwrap()
    }

    /// A fresh scratch directory for one test.
    pub(crate) fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("replay-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn lines(path: &Path) -> Result<Vec<String>, InputError> {
        let mut v = Vec::new();
        for_each_gz_line(path, |_, l| {
            v.push(l.to_string());
            Ok(())
        })?;
        Ok(v)
    }

    #[test]
    fn reads_lines() {
        let d = scratch("reads");
        let p = d.join("a.gz");
        std::fs::write(&p, gz("one\ntwo\r\nthree")).unwrap();
        assert_eq!(lines(&p).unwrap(), ["one", "two", "three"]);
    }

    #[test]
    fn truncated_gzip_is_an_error_naming_the_file() {
        let d = scratch("trunc");
        let p = d.join("t.gz");
        let text: String = (0..5000).map(|i| format!("line {i} {}\n", i * 7919)).collect();
        let full = gz(&text);
        for cut in [full.len() / 2, full.len() - 4, 12] {
            std::fs::write(&p, &full[..cut]).unwrap();
            let e = lines(&p).unwrap_err();
            assert_eq!(e.file, p);
            assert!(e.line >= 1, "{e}");
            assert!(e.to_string().contains("t.gz"), "{e}");
        }
    }

    #[test]
    fn not_gzip_empty_and_missing_are_errors() {
        let d = scratch("notgz");
        let p = d.join("plain.gz");
        std::fs::write(&p, "plain text\n").unwrap();
        assert!(lines(&p).is_err());
        std::fs::write(&p, "").unwrap();
        assert!(lines(&p).unwrap_err().msg.contains("empty"));
        assert!(lines(&d.join("missing.gz")).unwrap_err().msg.contains("cannot open"));
    }

    #[test]
    fn callback_errors_carry_the_line() {
        let d = scratch("cb");
        let p = d.join("c.gz");
        std::fs::write(&p, gz("a\nb\nc\n")).unwrap();
        let e = for_each_gz_line(&p, |_, l| if l == "b" { Err("bad b".into()) } else { Ok(()) }).unwrap_err();
        assert_eq!((e.line, e.msg.as_str()), (2, "bad b"));
        assert!(e.to_string().ends_with("c.gz:2: bad b"), "{e}");
    }
}
