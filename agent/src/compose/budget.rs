//! What a compose file may cost to load, checked before it becomes a tree.
//!
//! Parsing YAML into a [`serde_norway::Value`] copies every aliased node
//! (`*x`) in full. serde_norway bounds the alias *jumps* (100 times the
//! number of parser events) and nesting (128 levels), but not the nodes the
//! jumps expand to: a few kilobytes of anchors, each aliasing the previous
//! one a handful of times, expand to gigabytes. And it parses the whole text
//! before looking at the nesting, while libyaml's scanner spends time in
//! proportion to the flow nesting (`[[[[...`) on every token: a few megabytes
//! of `[` would keep it busy for hours.
//!
//! So before serde_norway sees the text, [`check`] streams the events of
//! the same parser (libyaml, from the same crate serde_norway uses) and
//! keeps only counts: the nesting depth, and for each anchor the nodes and
//! scalar bytes it expands to, so that an alias costs what it would copy. It
//! stops at the first limit passed, so its own time and memory stay bounded
//! (libyaml reads at most a line or 1024 characters ahead of the events).
//! Being the same parser, it sees exactly what serde_norway would build;
//! where libyaml stops with an error, serde_norway stops at the same place
//! and reports it.
//!
//! The nesting limit also bounds every recursive walk over the tree after it
//! (tags and extension keys in [`super::tree`], interpolation, typed
//! deserialization, dropping the tree).

use std::collections::HashMap;

/// The longest compose text accepted. Real compose files are a few
/// kilobytes; the limit leaves three orders of magnitude.
pub(crate) const MAX_TEXT_BYTES: usize = 4 << 20;

/// The most nodes (scalars, sequences, mappings, keys included) the file
/// may have once its aliases are expanded. A large compose file has a few
/// thousand; a million nodes is about 100 MB as a tree.
pub(crate) const MAX_NODES: u64 = 1_000_000;

/// The most scalar text the file may have once its aliases are expanded:
/// four times [`MAX_TEXT_BYTES`], so that any file under that limit passes
/// unless aliases copy long strings many times over.
pub(crate) const MAX_SCALAR_BYTES: u64 = 4 * MAX_TEXT_BYTES as u64;

/// How deeply mappings and sequences may nest (the top-level mapping is
/// level 1; `services.web.x-deploy.health` is level 4). Compose files go
/// about eight levels deep.
pub(crate) const MAX_DEPTH: usize = 64;

/// Why [`check`] refused the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// More than [`MAX_NODES`] nodes once aliases are expanded.
    Nodes,
    /// More than [`MAX_SCALAR_BYTES`] of scalar text once aliases are
    /// expanded.
    ScalarBytes,
    /// Nested deeper than [`MAX_DEPTH`], at this 1-based line.
    Depth { line: u64 },
    /// An alias inside the node its anchor names, at this 1-based line:
    /// it would expand forever.
    RecursiveAlias { line: u64, anchor: String },
    /// libyaml could not be started (out of memory).
    Parser,
}

/// Checks the text against the limits above without building it. A text
/// that is not valid YAML passes as far as it is valid: serde_norway then
/// reports the error, with its position.
pub(crate) fn check(text: &str) -> Result<(), Refusal> {
    let mut events = libyaml::Events::new(text).ok_or(Refusal::Parser)?;
    let mut count = Count::default();
    // One entry per open sequence or mapping: its anchor and its size so far.
    let mut open: Vec<(Option<Vec<u8>>, Size)> = Vec::new();
    // Anchors of the current document and the size they expand to; `None`
    // while the anchored node is still open.
    let mut anchors: HashMap<Vec<u8>, Option<Size>> = HashMap::new();
    loop {
        let Some((event, line)) = events.next() else {
            return Ok(());
        };
        let node = match event {
            libyaml::Event::StreamEnd => return Ok(()),
            libyaml::Event::DocumentStart => {
                anchors.clear();
                continue;
            }
            libyaml::Event::Other => continue,
            libyaml::Event::Scalar { anchor, len } => {
                let size = Size {
                    nodes: 1,
                    bytes: len,
                };
                if let Some(anchor) = anchor {
                    anchors.insert(anchor, Some(size));
                }
                size
            }
            libyaml::Event::Alias { anchor } => match anchors.get(&anchor) {
                Some(Some(size)) => *size,
                Some(None) => {
                    return Err(Refusal::RecursiveAlias {
                        line,
                        anchor: shown(&anchor),
                    });
                }
                // serde_norway stops here too, reporting the unknown anchor.
                None => return Ok(()),
            },
            libyaml::Event::CollectionStart { anchor } => {
                if open.len() >= MAX_DEPTH {
                    return Err(Refusal::Depth { line });
                }
                count.add(Size { nodes: 1, bytes: 0 })?;
                if let Some(anchor) = &anchor {
                    anchors.insert(anchor.clone(), None);
                }
                open.push((anchor, Size { nodes: 1, bytes: 0 }));
                continue;
            }
            libyaml::Event::CollectionEnd => {
                let Some((anchor, size)) = open.pop() else {
                    continue;
                };
                if let Some(anchor) = anchor {
                    anchors.insert(anchor, Some(size));
                }
                // Counted already, node by node.
                if let Some((_, parent)) = open.last_mut() {
                    parent.add(size);
                }
                continue;
            }
        };
        count.add(node)?;
        if let Some((_, parent)) = open.last_mut() {
            parent.add(node);
        }
    }
}

/// An anchor's name for a message, cut to 64 characters.
fn shown(anchor: &[u8]) -> String {
    let name = String::from_utf8_lossy(anchor);
    let mut chars = name.chars();
    let mut out: String = chars.by_ref().take(64).collect();
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

/// What a node expands to. Each is at most the limits (a node is only
/// recorded once counted within them), so sums cannot overflow.
#[derive(Debug, Clone, Copy, Default)]
struct Size {
    nodes: u64,
    bytes: u64,
}

impl Size {
    fn add(&mut self, other: Size) {
        self.nodes = self.nodes.saturating_add(other.nodes);
        self.bytes = self.bytes.saturating_add(other.bytes);
    }
}

/// The whole file's expanded size so far, against the limits.
#[derive(Default)]
struct Count(Size);

impl Count {
    fn add(&mut self, size: Size) -> Result<(), Refusal> {
        self.0.add(size);
        if self.0.nodes > MAX_NODES {
            return Err(Refusal::Nodes);
        }
        if self.0.bytes > MAX_SCALAR_BYTES {
            return Err(Refusal::ScalarBytes);
        }
        Ok(())
    }
}

/// libyaml's event stream, as much of it as [`check`] needs.
///
/// serde_norway keeps its own binding to unsafe-libyaml-norway private, so
/// this is a second one, as small as it can be: the crate is libyaml
/// translated to Rust, with libyaml's C interface.
mod libyaml {
    use std::ffi::CStr;
    use std::marker::PhantomData;
    use std::mem::MaybeUninit;

    use unsafe_libyaml_norway as unsafe_sys;

    pub(super) enum Event {
        StreamEnd,
        DocumentStart,
        Scalar {
            anchor: Option<Vec<u8>>,
            len: u64,
        },
        Alias {
            anchor: Vec<u8>,
        },
        /// A sequence or a mapping starts.
        CollectionStart {
            anchor: Option<Vec<u8>>,
        },
        CollectionEnd,
        /// Stream start, document end.
        Other,
    }

    /// A libyaml parser reading `'t` text.
    pub(super) struct Events<'t> {
        /// Initialized by `yaml_parser_initialize`; boxed because it must
        /// not move while libyaml holds pointers into it.
        parser: Box<MaybeUninit<unsafe_sys::yaml_parser_t>>,
        done: bool,
        /// libyaml reads the text through a raw pointer.
        text: PhantomData<&'t str>,
    }

    impl<'t> Events<'t> {
        /// `None` if libyaml cannot allocate its buffers.
        pub(super) fn new(text: &'t str) -> Option<Events<'t>> {
            let mut parser = Box::new(MaybeUninit::<unsafe_sys::yaml_parser_t>::uninit());
            let p = parser.as_mut_ptr();
            // SAFETY: `p` points to memory for a parser, which
            // `yaml_parser_initialize` zeroes and sets up; on failure it has
            // freed what it allocated, and the parser is dropped unused. The
            // text outlives the parser (`'t`), and is UTF-8, as declared, as
            // serde_norway does.
            unsafe {
                if unsafe_sys::yaml_parser_initialize(p).fail {
                    return None;
                }
                unsafe_sys::yaml_parser_set_encoding(p, unsafe_sys::YAML_UTF8_ENCODING);
                unsafe_sys::yaml_parser_set_input_string(p, text.as_ptr(), text.len() as u64);
            }
            Some(Events {
                parser,
                done: false,
                text: PhantomData,
            })
        }

        /// The next event and its 1-based line; `None` after the end of
        /// the stream or at the first error.
        pub(super) fn next(&mut self) -> Option<(Event, u64)> {
            if self.done {
                return None;
            }
            let mut raw = MaybeUninit::<unsafe_sys::yaml_event_t>::uninit();
            let p = self.parser.as_mut_ptr();
            // SAFETY: the parser was initialized in `new` and is not used
            // after an error (`done`). When `yaml_parser_parse` succeeds the
            // event is initialized; its union field is the one `type_`
            // names; its strings are NUL-terminated (anchors) or `length`
            // bytes long (scalars), and copied before `yaml_event_delete`
            // frees them.
            unsafe {
                if unsafe_sys::yaml_parser_parse(p, raw.as_mut_ptr()).fail {
                    self.done = true;
                    return None;
                }
                let e = raw.as_mut_ptr();
                let line = (*e).start_mark.line.saturating_add(1);
                let event = match (*e).type_ {
                    unsafe_sys::YAML_STREAM_END_EVENT => {
                        self.done = true;
                        Event::StreamEnd
                    }
                    unsafe_sys::YAML_DOCUMENT_START_EVENT => Event::DocumentStart,
                    unsafe_sys::YAML_SCALAR_EVENT => Event::Scalar {
                        anchor: anchor((*e).data.scalar.anchor),
                        len: (*e).data.scalar.length,
                    },
                    unsafe_sys::YAML_ALIAS_EVENT => Event::Alias {
                        anchor: anchor((*e).data.alias.anchor).unwrap_or_default(),
                    },
                    unsafe_sys::YAML_SEQUENCE_START_EVENT => Event::CollectionStart {
                        anchor: anchor((*e).data.sequence_start.anchor),
                    },
                    unsafe_sys::YAML_MAPPING_START_EVENT => Event::CollectionStart {
                        anchor: anchor((*e).data.mapping_start.anchor),
                    },
                    unsafe_sys::YAML_SEQUENCE_END_EVENT | unsafe_sys::YAML_MAPPING_END_EVENT => {
                        Event::CollectionEnd
                    }
                    _ => Event::Other,
                };
                unsafe_sys::yaml_event_delete(e);
                Some((event, line))
            }
        }
    }

    /// A copy of a NUL-terminated anchor name, if there is one.
    ///
    /// # Safety
    /// `ptr` is null or points to a NUL-terminated string.
    unsafe fn anchor(ptr: *const u8) -> Option<Vec<u8>> {
        if ptr.is_null() {
            return None;
        }
        // SAFETY: non-null and NUL-terminated, as the caller promises.
        Some(unsafe { CStr::from_ptr(ptr.cast()) }.to_bytes().to_vec())
    }

    impl Drop for Events<'_> {
        fn drop(&mut self) {
            // SAFETY: initialized in `new` (an `Events` exists only then),
            // deleted once, here.
            unsafe { unsafe_sys::yaml_parser_delete(self.parser.as_mut_ptr()) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_files_pass() {
        check("a: &x [1, 2, {b: c}]\nd: *x\ne: !tag [x]\n").unwrap();
        check("").unwrap();
        check("a: b\n---\nc: d\n").unwrap();
    }

    #[test]
    fn nodes_are_counted_with_aliases_expanded() {
        // The root mapping, n + 1 keys, and n + 1 copies of a sequence of
        // 1000 items: 1 + 1002 * (n + 1) nodes once expanded.
        let file = |n: usize| {
            let mut text = format!("a: &a [{}]\n", vec!["1"; 1000].join(","));
            for i in 0..n {
                text.push_str(&format!("k{i}: *a\n"));
            }
            text
        };
        // 1,000,999 nodes from 13 KB.
        assert!(file(998).len() < 15_000);
        assert_eq!(check(&file(998)), Err(Refusal::Nodes));
        // 999,997.
        check(&file(997)).unwrap();
    }

    #[test]
    fn anchors_of_nested_nodes_count_their_contents() {
        // `*b` is 3 nodes (the sequence, `y`, and `*a` inside it); `*c` is
        // 5 (the mapping, the key `k`, and `*b`); `e` is 1 + 1000 * 5.
        let file = |copies: usize| {
            format!(
                "a: &a x\nb: &b [y, *a]\nc: &c {{k: *b}}\ne: &e [{}]\nf: [{}]\n",
                vec!["*c"; 1000].join(","),
                vec!["*e"; copies].join(",")
            )
        };
        // The root, 5 keys, a, b, c, e (5016), then f: 1 + copies * 5001.
        // 1,000,216 nodes:
        assert_eq!(check(&file(199)), Err(Refusal::Nodes));
        // 995,215:
        check(&file(198)).unwrap();
    }

    #[test]
    fn scalar_bytes_are_counted_with_aliases_expanded() {
        let long = "x".repeat(1 << 20);
        let mut text = format!("a: &a {long}\n");
        for i in 0..16 {
            text.push_str(&format!("k{i}: *a\n"));
        }
        assert_eq!(check(&text), Err(Refusal::ScalarBytes));
        check(&format!("a: &a {long}\nb: *a\n")).unwrap();
    }

    #[test]
    fn depth_is_limited_and_located() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        check(&ok).unwrap();
        let deep = format!(
            "a:\n  b: {}{}",
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        assert_eq!(check(&deep), Err(Refusal::Depth { line: 2 }));
        // Refused at once, however deep it goes: libyaml's scanner is
        // quadratic in the flow nesting, so parsing all of it first would
        // take hours.
        let deeper = format!("a: {}", "[".repeat(MAX_TEXT_BYTES - 3));
        assert_eq!(check(&deeper), Err(Refusal::Depth { line: 1 }));
    }

    #[test]
    fn recursive_aliases_are_refused() {
        assert_eq!(
            check("a: &a [x, *a]\n"),
            Err(Refusal::RecursiveAlias {
                line: 1,
                anchor: "a".into()
            })
        );
        // As in serde_norway, an anchor names its node from the node's
        // start: here `*a` is `b` itself, not the `a` before it.
        assert!(matches!(
            check("a: &a [x]\nb: &a [*a]\n"),
            Err(Refusal::RecursiveAlias { line: 2, .. })
        ));
        // Redefined, an anchor names the latest node.
        check("a: &a [x]\nb: &a [y]\nc: *a\n").unwrap();
    }

    #[test]
    fn invalid_yaml_is_left_to_serde_norway() {
        check("a: [\n").unwrap();
        check("a: *nope\nb: [[[[[[[[\n").unwrap();
    }
}
