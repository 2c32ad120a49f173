//! Where baton's own log lines go when there is no journald: stderr, but a line
//! that cannot be written (a closed pipe, a full disk, `2>/dev/full`) is dropped
//! and counted. baton must never die, and orphan its app, over a log line.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped because stderr could not take them.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// A `MakeWriter` for tracing-subscriber: stderr that never fails.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // One event is one `write_all` of its whole line (tracing-subscriber
        // formats into a buffer first), so a failure drops exactly one line.
        if io::stderr().lock().write_all(buf).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Self::Writer {
        Stderr
    }
}

/// One line on stderr that never panics (`eprintln!` does when stderr is closed or
/// full): for baton's own error lines outside the log.
pub fn error_line(line: std::fmt::Arguments<'_>) {
    if writeln!(io::stderr(), "{line}").is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// `eprintln!` through [`error_line`].
#[macro_export]
macro_rules! say_err {
    ($($arg:tt)*) => {
        $crate::logsink::error_line(format_args!($($arg)*))
    };
}
