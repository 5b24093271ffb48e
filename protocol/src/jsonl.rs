//! The JSON-lines codec: one JSON document per line, `\n`-terminated.
//!
//! Every stream in the system uses it: a deploy's events from the daemon,
//! `serve-stdio`'s output over SSH, `--json` output, `audit export`.

use serde::Serialize;

/// The longest line a reader accepts. An event carries at most a hook's
/// output tail and a result's digests; a longer line is a broken or hostile
/// peer, and reading it whole would let that peer choose our memory use.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// `v` as one line (JSON and `\n`).
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(v)?;
    line.push(b'\n');
    Ok(line)
}

/// A line longer than [`MAX_LINE`] arrived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a JSON line longer than {max} bytes arrived; the peer is broken or hostile")]
pub struct LineTooLong {
    pub max: usize,
}

/// Splits a byte stream into lines as chunks arrive.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
}

impl Splitter {
    pub fn new() -> Splitter {
        Splitter::default()
    }

    /// Adds a chunk; then take the complete lines with [`Splitter::next_line`].
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), LineTooLong> {
        self.buf.extend_from_slice(chunk);
        if self.buf.len() > MAX_LINE && !self.buf.contains(&b'\n') {
            return Err(LineTooLong { max: MAX_LINE });
        }
        Ok(())
    }

    /// The next complete line, without its `\n` and surrounding whitespace;
    /// blank lines are skipped.
    pub fn next_line(&mut self) -> Option<Vec<u8>> {
        loop {
            let nl = self.buf.iter().position(|&b| b == b'\n')?;
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = line.trim_ascii();
            if !line.is_empty() {
                return Some(line.to_vec());
            }
        }
    }

    /// What is left after the stream ended: a last line without `\n`.
    pub fn finish(self) -> Option<Vec<u8>> {
        let rest = self.buf.trim_ascii();
        (!rest.is_empty()).then(|| rest.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks() {
        let mut s = Splitter::new();
        s.push(b"{\"a\":1}\n\n{\"b\"").unwrap();
        assert_eq!(s.next_line().unwrap(), b"{\"a\":1}");
        assert_eq!(s.next_line(), None);
        s.push(b":2}\r\n{\"c\":3}").unwrap();
        assert_eq!(s.next_line().unwrap(), b"{\"b\":2}");
        assert_eq!(s.next_line(), None);
        assert_eq!(s.finish().unwrap(), b"{\"c\":3}");
        assert_eq!(
            encode(&serde_json::json!({"x": 1})).unwrap(),
            b"{\"x\":1}\n"
        );
    }

    #[test]
    fn an_endless_line_is_refused() {
        let mut s = Splitter::new();
        let chunk = vec![b'x'; 1024 * 1024];
        let mut refused = false;
        for _ in 0..20 {
            if s.push(&chunk).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
    }
}
