//! RESP2 request parsing and reply encoding.
//!
//! Requests come either as multibulk arrays (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`, what every
//! client library sends) or as inline commands (`PING\r\n`, what `nc`/`socat`/telnet users
//! type). The parser never consumes a partial frame: it reports [`Parsed::Incomplete`] and
//! the caller waits for more bytes. Arguments borrow from the read buffer whenever they can,
//! so the hot path allocates only the argument vector.
//!
//! Limits and error texts follow Redis, so clients see the same behaviour.

use std::borrow::Cow;

/// Longest inline command, and longest `*N` / `$N` header line (Redis: `PROTO_INLINE_MAX_SIZE`).
pub const INLINE_MAX: usize = 64 * 1024;
/// Largest bulk argument (Redis default `proto-max-bulk-len`).
pub const BULK_MAX: i64 = 512 * 1024 * 1024;
/// Most arguments in one multibulk request.
pub const MULTIBULK_MAX: i64 = 1024 * 1024;

/// The arguments of one command; `args[0]` is the command name.
pub type Args<'a> = Vec<Cow<'a, [u8]>>;

/// A malformed request. The connection answers `-ERR <Display>` and closes, like Redis.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// `*N` with N not a number or too large.
    #[error("Protocol error: invalid multibulk length")]
    InvalidMultibulkLength,
    /// `$N` with N not a number, negative or too large.
    #[error("Protocol error: invalid bulk length")]
    InvalidBulkLength,
    /// An array element that is not a bulk string.
    #[error("Protocol error: expected '$', got '{}'", char::from(*.0))]
    ExpectedDollar(u8),
    /// An inline command longer than [`INLINE_MAX`] without a newline.
    #[error("Protocol error: too big inline request")]
    TooBigInline,
    /// A `*N` header line longer than [`INLINE_MAX`].
    #[error("Protocol error: too big mbulk count string")]
    TooBigMultibulkCount,
    /// A `$N` header line longer than [`INLINE_MAX`].
    #[error("Protocol error: too big bulk count string")]
    TooBigBulkCount,
    /// An inline command with an unterminated quote.
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
}

/// Outcome of parsing the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// The buffer holds no complete frame yet; nothing was consumed.
    Incomplete,
    /// One frame of `len` bytes. `args` is empty for frames Redis ignores (a blank inline
    /// line, `*0`, `*-1`); the caller consumes them and runs nothing.
    Frame {
        /// The command and its arguments.
        args: Args<'a>,
        /// Bytes the frame occupies at the front of the buffer.
        len: usize,
    },
}

/// Parses one request frame from the front of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed<'_>, ProtocolError> {
    match buf.first() {
        None => Ok(Parsed::Incomplete),
        Some(b'*') => parse_multibulk(buf),
        Some(_) => parse_inline(buf),
    }
}

/// Finds the `\r` ending a header line that starts at `from`, and returns its index once the
/// byte after it (the `\n`) has arrived too. Like Redis, the `\n` itself is not checked.
fn header_end(buf: &[u8], from: usize) -> Option<usize> {
    let cr = from + memchr(b'\r', &buf[from..])?;
    (cr + 1 < buf.len()).then_some(cr)
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

fn parse_multibulk(buf: &[u8]) -> Result<Parsed<'_>, ProtocolError> {
    let Some(cr) = header_end(buf, 1) else {
        if buf.len() > INLINE_MAX {
            return Err(ProtocolError::TooBigMultibulkCount);
        }
        return Ok(Parsed::Incomplete);
    };
    if cr > INLINE_MAX {
        return Err(ProtocolError::TooBigMultibulkCount);
    }
    let count = parse_i64(&buf[1..cr])
        .filter(|&n| n <= MULTIBULK_MAX)
        .ok_or(ProtocolError::InvalidMultibulkLength)?;
    let mut pos = cr + 2;
    if count <= 0 {
        return Ok(Parsed::Frame {
            args: Vec::new(),
            len: pos,
        });
    }
    // `count` is at most MULTIBULK_MAX, so it fits; cap the up-front allocation so a
    // client announcing a huge array cannot make us reserve memory it never sends.
    let count = usize::try_from(count).map_err(|_| ProtocolError::InvalidMultibulkLength)?;
    let mut args = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let Some(&first) = buf.get(pos) else {
            return Ok(Parsed::Incomplete);
        };
        if first != b'$' {
            return Err(ProtocolError::ExpectedDollar(first));
        }
        let Some(cr) = header_end(buf, pos + 1) else {
            if buf.len() - pos > INLINE_MAX {
                return Err(ProtocolError::TooBigBulkCount);
            }
            return Ok(Parsed::Incomplete);
        };
        if cr - pos > INLINE_MAX {
            return Err(ProtocolError::TooBigBulkCount);
        }
        let len = parse_i64(&buf[pos + 1..cr])
            .filter(|&n| (0..=BULK_MAX).contains(&n))
            .ok_or(ProtocolError::InvalidBulkLength)?;
        let len = usize::try_from(len).map_err(|_| ProtocolError::InvalidBulkLength)?;
        let start = cr + 2;
        let end = start + len;
        // The payload is followed by `\r\n`, which Redis skips without checking.
        if end + 2 > buf.len() {
            return Ok(Parsed::Incomplete);
        }
        args.push(Cow::Borrowed(&buf[start..end]));
        pos = end + 2;
    }
    Ok(Parsed::Frame { args, len: pos })
}

fn parse_inline(buf: &[u8]) -> Result<Parsed<'_>, ProtocolError> {
    let Some(nl) = memchr(b'\n', buf) else {
        if buf.len() > INLINE_MAX {
            return Err(ProtocolError::TooBigInline);
        }
        return Ok(Parsed::Incomplete);
    };
    if nl > INLINE_MAX {
        return Err(ProtocolError::TooBigInline);
    }
    let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]);
    let args = split_args(line).ok_or(ProtocolError::UnbalancedQuotes)?;
    Ok(Parsed::Frame { args, len: nl + 1 })
}

/// Splits an inline command line the way Redis' `sdssplitargs` does: whitespace separates
/// arguments, `"..."` understands `\n \r \t \b \a \\ \" \xHH`, `'...'` understands `\'`.
/// A closing quote must be followed by whitespace or the end of the line. Returns `None`
/// for unbalanced quotes.
pub fn split_args(line: &[u8]) -> Option<Args<'_>> {
    let mut args = Vec::new();
    let mut p = 0;
    loop {
        while p < line.len() && is_space(line[p]) {
            p += 1;
        }
        // A NUL ends the line, as it ends the C string `sdssplitargs` walks. (It is no
        // space, so without this an unquoted NUL would be an empty word, forever.)
        if p == line.len() || line[p] == 0 {
            return Some(args);
        }
        let start = p;
        // Fast path: an unquoted word borrows from the line.
        while p < line.len() && !is_word_end(line[p]) && line[p] != b'"' && line[p] != b'\'' {
            p += 1;
        }
        if p == line.len() || is_word_end(line[p]) {
            args.push(Cow::Borrowed(&line[start..p]));
            continue;
        }
        // Slow path: the word contains quotes; build it byte by byte.
        let mut cur = line[start..p].to_vec();
        let mut in_dq = false;
        let mut in_sq = false;
        loop {
            if in_dq {
                let c = *line.get(p)?;
                if c == b'\\' && line.get(p + 1) == Some(&b'x') {
                    if let (Some(h), Some(l)) = (
                        line.get(p + 2).and_then(|&b| hex(b)),
                        line.get(p + 3).and_then(|&b| hex(b)),
                    ) {
                        cur.push(h * 16 + l);
                        p += 4;
                        continue;
                    }
                }
                if c == b'\\' && p + 1 < line.len() {
                    cur.push(match line[p + 1] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                    p += 2;
                } else if c == b'"' {
                    // The closing quote must end the word.
                    if line.get(p + 1).is_some_and(|&b| !is_space(b)) {
                        return None;
                    }
                    p += 1;
                    break;
                } else {
                    cur.push(c);
                    p += 1;
                }
            } else if in_sq {
                let c = *line.get(p)?;
                if c == b'\\' && line.get(p + 1) == Some(&b'\'') {
                    cur.push(b'\'');
                    p += 2;
                } else if c == b'\'' {
                    if line.get(p + 1).is_some_and(|&b| !is_space(b)) {
                        return None;
                    }
                    p += 1;
                    break;
                } else {
                    cur.push(c);
                    p += 1;
                }
            } else {
                match line.get(p) {
                    None => break,
                    Some(&c) if is_word_end(c) => break,
                    Some(b'"') => in_dq = true,
                    Some(b'\'') => in_sq = true,
                    Some(&c) => cur.push(c),
                }
                p += 1;
            }
        }
        args.push(Cow::Owned(cur));
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Bytes that end an unquoted word in `sdssplitargs`.
fn is_word_end(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\r' | b'\t' | 0)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Parses a signed 64-bit integer the way Redis' `string2ll` does: optional `-`, no `+`,
/// no leading zeros, no spaces, no `-0`. A string this accepts is the canonical decimal
/// form of its value, so formatting the result gives back the same bytes.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    // Accumulate negatively so that i64::MIN parses without overflow.
    let mut acc: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        acc = acc.checked_mul(10)?.checked_sub(i64::from(d - b'0'))?;
    }
    if neg { Some(acc) } else { acc.checked_neg() }
}

/// Appends `n` in decimal.
pub fn push_i64(out: &mut Vec<u8>, n: i64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        // `v % 10` is below 10, so the cast cannot truncate.
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&tmp[i..]);
}

/// `+OK`-style status reply.
pub fn simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `-ERR ...` reply. `msg` excludes the leading `-`; CR and LF become spaces so that a
/// message quoting client input cannot break the framing (Redis does the same).
pub fn error(out: &mut Vec<u8>, msg: &str) {
    out.push(b'-');
    out.extend(
        msg.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

/// `:N` reply.
pub fn integer(out: &mut Vec<u8>, n: i64) {
    out.push(b':');
    push_i64(out, n);
    out.extend_from_slice(b"\r\n");
}

/// `$N\r\n...\r\n` reply.
pub fn bulk(out: &mut Vec<u8>, data: &[u8]) {
    out.push(b'$');
    push_len(out, data.len());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// `$-1` (nil) reply.
pub fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// `*N` array header; the caller appends N replies.
pub fn array(out: &mut Vec<u8>, len: usize) {
    out.push(b'*');
    push_len(out, len);
    out.extend_from_slice(b"\r\n");
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    // Lengths are bounded by memory, far below i64::MAX.
    push_i64(out, i64::try_from(len).unwrap_or(i64::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(buf: &[u8]) -> (Vec<Vec<u8>>, usize) {
        match parse(buf).unwrap() {
            Parsed::Frame { args, len } => {
                (args.into_iter().map(|a| a.into_owned()).collect(), len)
            }
            Parsed::Incomplete => panic!("incomplete: {:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn words(v: &[&str]) -> Vec<Vec<u8>> {
        v.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn multibulk_complete() {
        let buf = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
        let (args, len) = frame(buf);
        assert_eq!(args, words(&["SET", "k", "hello"]));
        assert_eq!(len, buf.len());
    }

    #[test]
    fn multibulk_is_binary_safe() {
        let buf = b"*2\r\n$3\r\nGET\r\n$4\r\na\r\n\0\r\n";
        let (args, len) = frame(buf);
        assert_eq!(args, vec![b"GET".to_vec(), b"a\r\n\0".to_vec()]);
        assert_eq!(len, buf.len());
    }

    #[test]
    fn every_split_point_is_incomplete_until_the_end() {
        let buf = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$10\r\n0123456789\r\n";
        for cut in 0..buf.len() {
            assert_eq!(
                parse(&buf[..cut]).unwrap(),
                Parsed::Incomplete,
                "cut at {cut}"
            );
        }
        assert_eq!(frame(buf).1, buf.len());
    }

    #[test]
    fn inline_split_points() {
        let buf = b"SET k v\r\n";
        for cut in 0..buf.len() {
            assert_eq!(
                parse(&buf[..cut]).unwrap(),
                Parsed::Incomplete,
                "cut at {cut}"
            );
        }
        assert_eq!(frame(buf), (words(&["SET", "k", "v"]), buf.len()));
    }

    #[test]
    fn pipeline_parses_frame_by_frame() {
        let buf = b"PING\r\n*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n*1\r\n$4\r\nPI";
        let mut pos = 0;
        let mut seen = Vec::new();
        while let Parsed::Frame { args, len } = parse(&buf[pos..]).unwrap() {
            seen.push(args.into_iter().map(|a| a.into_owned()).collect::<Vec<_>>());
            pos += len;
        }
        assert_eq!(
            seen,
            vec![words(&["PING"]), words(&["PING"]), words(&["ECHO", "hi"])]
        );
        assert_eq!(&buf[pos..], b"*1\r\n$4\r\nPI");
    }

    #[test]
    fn inline_without_cr_and_blank_lines() {
        assert_eq!(frame(b"PING\n"), (words(&["PING"]), 5));
        assert_eq!(frame(b"\r\n"), (vec![], 2));
        assert_eq!(frame(b"   \n"), (vec![], 4));
        assert_eq!(frame(b"  get   k  \r\n").0, words(&["get", "k"]));
    }

    #[test]
    fn inline_quotes_and_escapes() {
        assert_eq!(
            frame(b"SET \"a b\" 'c d'\r\n").0,
            words(&["SET", "a b", "c d"])
        );
        assert_eq!(
            frame(b"ECHO \"\\x41\\n\\t\\\"q\"\r\n").0,
            vec![b"ECHO".to_vec(), b"A\n\t\"q".to_vec()]
        );
        assert_eq!(frame(b"ECHO 'it\\'s'\r\n").0, words(&["ECHO", "it's"]));
        assert_eq!(frame(b"ECHO a\"b c\"\r\n").0, words(&["ECHO", "ab c"]));
        assert_eq!(frame(b"ECHO \"\"\r\n").0, words(&["ECHO", ""]));
    }

    #[test]
    fn inline_unbalanced_quotes() {
        assert_eq!(
            parse(b"ECHO \"abc\r\n"),
            Err(ProtocolError::UnbalancedQuotes)
        );
        assert_eq!(
            parse(b"ECHO 'abc\r\n"),
            Err(ProtocolError::UnbalancedQuotes)
        );
        assert_eq!(
            parse(b"ECHO \"a\"b\r\n"),
            Err(ProtocolError::UnbalancedQuotes)
        );
    }

    #[test]
    fn multibulk_errors() {
        assert_eq!(parse(b"*x\r\n"), Err(ProtocolError::InvalidMultibulkLength));
        assert_eq!(
            parse(b"*99999999999\r\n"),
            Err(ProtocolError::InvalidMultibulkLength)
        );
        assert_eq!(
            parse(b"*1\r\n+OK\r\n"),
            Err(ProtocolError::ExpectedDollar(b'+'))
        );
        assert_eq!(
            parse(b"*1\r\n$-1\r\n"),
            Err(ProtocolError::InvalidBulkLength)
        );
        assert_eq!(
            parse(b"*1\r\n$abc\r\n"),
            Err(ProtocolError::InvalidBulkLength)
        );
        assert_eq!(
            parse(b"*1\r\n$600000000\r\n"),
            Err(ProtocolError::InvalidBulkLength)
        );
        assert_eq!(
            ProtocolError::ExpectedDollar(b'+').to_string(),
            "Protocol error: expected '$', got '+'"
        );
    }

    #[test]
    fn empty_multibulk_is_skipped() {
        assert_eq!(frame(b"*0\r\n"), (vec![], 4));
        assert_eq!(frame(b"*-1\r\n"), (vec![], 5));
    }

    #[test]
    fn oversized_headers_are_rejected_not_buffered_forever() {
        let long = vec![b'a'; INLINE_MAX + 1];
        assert_eq!(parse(&long), Err(ProtocolError::TooBigInline));
        let mut mb = b"*".to_vec();
        mb.extend(std::iter::repeat_n(b'1', INLINE_MAX + 1));
        assert_eq!(parse(&mb), Err(ProtocolError::TooBigMultibulkCount));
        let mut bulk = b"*1\r\n$".to_vec();
        bulk.extend(std::iter::repeat_n(b'1', INLINE_MAX + 1));
        assert_eq!(parse(&bulk), Err(ProtocolError::TooBigBulkCount));
    }

    #[test]
    fn parse_i64_is_strict_like_redis() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-1"), Some(-1));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"-0",
            b"01",
            b"+1",
            b" 1",
            b"1 ",
            b"1.0",
            b"9223372036854775808",
            b"-9223372036854775809",
            b"abc",
        ] {
            assert_eq!(parse_i64(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn push_i64_round_trips() {
        for n in [0, 1, -1, 42, -42, i64::MAX, i64::MIN, 1_000_000] {
            let mut out = Vec::new();
            push_i64(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
            assert_eq!(parse_i64(&out), Some(n));
        }
    }

    #[test]
    fn reply_encoding() {
        let mut out = Vec::new();
        simple(&mut out, "OK");
        error(&mut out, "ERR bad\r\nthing");
        integer(&mut out, -3);
        bulk(&mut out, b"hi");
        null(&mut out);
        array(&mut out, 2);
        assert_eq!(
            out,
            b"+OK\r\n-ERR bad  thing\r\n:-3\r\n$2\r\nhi\r\n$-1\r\n*2\r\n".to_vec()
        );
    }

    #[test]
    fn a_nul_ends_an_inline_command() {
        let got = |l: &[u8]| -> Vec<Vec<u8>> {
            split_args(l)
                .unwrap()
                .into_iter()
                .map(|a| a.into_owned())
                .collect()
        };
        assert_eq!(got(b"GET \0x"), vec![b"GET".to_vec()]);
        assert_eq!(got(b"\0"), Vec::<Vec<u8>>::new());
        assert_eq!(got(b"SET a\0b c"), vec![b"SET".to_vec(), b"a".to_vec()]);
        // Inside quotes a NUL is data.
        assert_eq!(
            got(b"SET \"a\0b\""),
            vec![b"SET".to_vec(), b"a\0b".to_vec()]
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn multibulk(args: &[Vec<u8>]) -> Vec<u8> {
            let mut out = format!("*{}\r\n", args.len()).into_bytes();
            for a in args {
                out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                out.extend_from_slice(a);
                out.extend_from_slice(b"\r\n");
            }
            out
        }

        proptest! {
            /// Any bytes give a frame, "incomplete" or a protocol error; never a panic,
            /// and a frame never claims more bytes than there are.
            #[test]
            fn arbitrary_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..600)) {
                if let Ok(Parsed::Frame { len, .. }) = parse(&buf) {
                    prop_assert!(len > 0 && len <= buf.len());
                }
            }

            /// A multibulk command comes back exactly; every strict prefix is incomplete.
            #[test]
            fn multibulk_round_trips_and_prefixes_are_incomplete(
                args in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..6),
                cut in any::<prop::sample::Index>(),
            ) {
                let wire = multibulk(&args);
                let (got, len) = frame(&wire);
                prop_assert_eq!(got, args);
                prop_assert_eq!(len, wire.len());
                let at = cut.index(wire.len());
                prop_assert_eq!(parse(&wire[..at]).unwrap(), Parsed::Incomplete);
            }
        }
    }
}
