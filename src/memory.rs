//! The process's own memory: giving back the pages of code that only start-up ran.
//!
//! Start-up (argument parsing, the log filter, TLS and gRPC set-up, the first connection to
//! the agent) touches code all over the executable and its libraries, and the kernel maps
//! file pages 64 KiB at a time around each fault, so an idle bridge kept 10.4 MiB of its
//! executable resident where idle serving needs 3.6 MiB (BENCHMARKS.md §4.5).
//! [`release_startup_code`] unmaps the read-only file pages once serving has settled; what
//! serving needs comes back as minor faults from the page cache, and the pages nobody maps
//! any more are the first the kernel reclaims under pressure.
//!
//! Only file mappings that are not writable and hold no anonymous (copy-on-write) pages
//! are touched: their contents are exactly the file's, so a page read again after
//! `MADV_DONTNEED` is the page that was there. The relocated read-only data (RELRO) of the
//! executable and of each library has anonymous pages and is always left alone.

use std::path::PathBuf;

/// Why start-up code could not be released (nothing was changed then).
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("madvise(MADV_DONTNEED) of {len} bytes at {start:#x}: {source}")]
    Madvise {
        start: usize,
        len: usize,
        source: std::io::Error,
    },
}

/// One mapping of `/proc/self/smaps` that [`release_startup_code`] may release.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Releasable {
    start: usize,
    end: usize,
    /// Resident before release (kB, as smaps counts).
    rss_kb: u64,
}

/// Unmaps the clean read-only file pages of the executable and its libraries; returns the
/// bytes that were resident in them.
pub fn release_startup_code() -> Result<u64, MemoryError> {
    let smaps = read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for mapping in releasable_mappings(&smaps) {
        dont_need(&mapping)?;
        released += mapping.rss_kb * 1024;
    }
    Ok(released)
}

#[expect(
    unsafe_code,
    reason = "madvise on our own mapping; see the SAFETY note"
)]
fn dont_need(mapping: &Releasable) -> Result<(), MemoryError> {
    let len = mapping.end - mapping.start;
    // SAFETY: the range is one whole file mapping, read-only and without
    // anonymous pages (checked in smaps just now): every page equals the file's contents,
    // and MADV_DONTNEED on a private file mapping only drops page-table entries, so the
    // next access reads the same bytes back from the page cache. No Rust reference is
    // invalidated: the memory stays mapped and its contents unchanged.
    unsafe {
        rustix::mm::madvise(
            mapping.start as *mut std::ffi::c_void,
            len,
            rustix::mm::Advice::LinuxDontNeed,
        )
    }
    .map_err(|errno| MemoryError::Madvise {
        start: mapping.start,
        len,
        source: errno.into(),
    })
}

/// The file mappings in `smaps` text that are not writable and hold no anonymous pages.
fn releasable_mappings(smaps: &str) -> Vec<Releasable> {
    let mut found = Vec::new();
    // The read-only file mapping whose fields are being read, and whether it is still clean
    // (no anonymous page seen).
    let mut current: Option<(Releasable, bool)> = None;
    for line in smaps.lines() {
        if let Some(header) = parse_header(line) {
            found.extend(current.take().and_then(|(m, clean)| clean.then_some(m)));
            current = header.filter(|h| !h.writable).map(|h| {
                let mapping = Releasable {
                    start: h.start,
                    end: h.end,
                    rss_kb: 0,
                };
                (mapping, true)
            });
            continue;
        }
        let Some((mapping, clean)) = current.as_mut() else {
            continue;
        };
        if let Some(kb) = field_kb(line, "Rss:") {
            mapping.rss_kb = kb;
        } else if let Some(kb) = field_kb(line, "Anonymous:") {
            *clean &= kb == 0;
        }
    }
    found.extend(current.and_then(|(m, clean)| clean.then_some(m)));
    found
}

struct Header {
    start: usize,
    end: usize,
    writable: bool,
}

/// `Some(Some(header))` for a file mapping line, `Some(None)` for an anonymous or special
/// mapping (`[heap]`, `[vdso]`, …), `None` for a field line.
fn parse_header(line: &str) -> Option<Option<Header>> {
    let mut parts = line.splitn(6, ' ');
    let range = parts.next()?;
    let (start, end) = range.split_once('-')?;
    let (Ok(start), Ok(end)) = (
        usize::from_str_radix(start, 16),
        usize::from_str_radix(end, 16),
    ) else {
        return None;
    };
    let perms = parts.next().unwrap_or_default();
    // offset, device, inode, then the path after padding.
    let path = parts.nth(3).map(str::trim).unwrap_or_default();
    if !path.starts_with('/') {
        return Some(None);
    }
    Some(Some(Header {
        start,
        end,
        writable: perms.contains('w'),
    }))
}

fn field_kb(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

fn read_to_string(path: &str) -> Result<String, MemoryError> {
    std::fs::read_to_string(path).map_err(|source| MemoryError::Read {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const EXE: &str = "/usr/local/bin/svid-bridge";

    /// The shape of a PIE executable's mappings: read-only data, text, RELRO (relocated:
    /// anonymous pages), writable data; then the heap, a shared library, anonymous memory and
    /// a special mapping.
    fn smaps() -> String {
        smaps_with_text_anonymous_kb(0)
    }

    fn smaps_with_text_anonymous_kb(text_anonymous_kb: u64) -> String {
        let mapping = |range: &str, perms: &str, path: &str, rss: u64, anon: u64| {
            format!(
                "{range} {perms} 00000000 fe:00 42                     {path}\n\
                 Size:              9999 kB\nRss:            {rss} kB\nPss:  1 kB\n\
                 Anonymous:      {anon} kB\nVmFlags: rd mr mw me\n"
            )
        };
        [
            mapping("5000-6000", "r--p", EXE, 1792, 0),
            mapping("6000-9000", "r-xp", EXE, 7968, text_anonymous_kb),
            mapping("9000-a000", "r--p", EXE, 640, 636),
            mapping("a000-b000", "rw-p", EXE, 32, 32),
            mapping("b000-c000", "rw-p", "[heap]", 8, 8),
            mapping("c000-d000", "r-xp", "/usr/lib/libc.so.6", 1400, 0),
            mapping("d000-e000", "rw-p", "", 536, 536),
            mapping("e000-f000", "r--p", "[vvar]", 16, 0),
        ]
        .concat()
    }

    #[test]
    fn only_clean_read_only_file_mappings_are_released() {
        let found = releasable_mappings(&smaps());
        assert_eq!(
            found,
            vec![
                Releasable {
                    start: 0x5000,
                    end: 0x6000,
                    rss_kb: 1792
                },
                Releasable {
                    start: 0x6000,
                    end: 0x9000,
                    rss_kb: 7968
                },
                Releasable {
                    start: 0xc000,
                    end: 0xd000,
                    rss_kb: 1400
                },
            ],
            "RELRO (anonymous pages), writable data, the heap, anonymous memory and [vvar] stay"
        );
    }

    #[test]
    fn a_text_page_written_by_a_debugger_keeps_its_mapping() {
        // A breakpoint makes a copy-on-write (anonymous) page in the text mapping.
        let found = releasable_mappings(&smaps_with_text_anonymous_kb(4));
        let starts: Vec<usize> = found.iter().map(|m| m.start).collect();
        assert_eq!(starts, vec![0x5000, 0xc000], "the text mapping stays whole");
    }

    trait Greeter {
        fn greet(&self, name: &str) -> String;
    }
    struct Hello;
    impl Greeter for Hello {
        fn greet(&self, name: &str) -> String {
            format!("hello, {name}")
        }
    }

    #[test]
    fn code_and_relocated_data_still_work_after_release() {
        // This test binary is an executable like ours: release its pages for real, then
        // run code through a vtable (relocated data) and formatting (read-only data).
        let greeter: Box<dyn Greeter> = Box::new(Hello);
        let released = release_startup_code().unwrap();
        assert!(released > 0, "the test binary had resident code pages");
        assert_eq!(greeter.greet("envoy"), "hello, envoy");
        let after = read_to_string("/proc/self/smaps").unwrap();
        assert!(
            !releasable_mappings(&after).is_empty(),
            "the mappings stay (only their pages were dropped)"
        );
    }
}
