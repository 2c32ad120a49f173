//! Command execution: Redis semantics and error strings for the supported subset.
//!
//! Pure with respect to I/O: a command reads and writes the [`Db`] and appends its reply to
//! an output buffer, so the whole command set is unit-tested without sockets.

use std::borrow::Cow;

use crate::db::Db;
use crate::resp::{self, parse_i64, push_i64};

const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
const OVERFLOW: &str = "ERR increment or decrement would overflow";
const SYNTAX: &str = "ERR syntax error";
const NO_EXPIRY: &str = "ERR kv-server does not support key expiry (EX/PX/EXAT/PXAT)";

/// Server facts reported by INFO, gathered only when INFO runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// This process' pid.
    pub pid: u32,
    /// `BATON_GENERATION`, 0 when running standalone.
    pub generation: u64,
    /// The state schema this binary writes.
    pub schema: u32,
    /// Schema of the snapshot this process restored, if it restored one.
    pub restored_from: Option<u32>,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Client connections open now.
    pub connected_clients: u64,
    /// Client connections accepted since start.
    pub total_connections: u64,
}

/// Per-connection state that commands change. It travels with the connection when it is
/// handed to the next generation (as the `meta` of the hand-over).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// Set by `CLIENT SETNAME`.
    pub name: Option<String>,
}

impl Session {
    /// The hand-over metadata. `db` is always 0 (only `SELECT 0` is supported) but is sent so
    /// that a successor with more databases knows where the client is.
    pub fn to_meta(&self) -> serde_json::Value {
        serde_json::json!({ "name": self.name, "db": 0 })
    }

    /// The session of an adopted connection, from the predecessor's [`Session::to_meta`].
    /// Unknown or missing fields fall back to the defaults (an older predecessor may send
    /// less); a name that `CLIENT SETNAME` would refuse is dropped.
    pub fn from_meta(meta: &serde_json::Value) -> Session {
        let name = meta
            .get("name")
            .and_then(serde_json::Value::as_str)
            .filter(|n| valid_client_name(n.as_bytes()))
            .map(str::to_owned);
        Session { name }
    }
}

/// Redis' rule for connection names: printable ASCII without spaces.
fn valid_client_name(name: &[u8]) -> bool {
    name.iter().all(|b| (b'!'..=b'~').contains(b))
}

/// What the connection does after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Keep serving.
    Continue,
    /// Write the replies so far, then close (QUIT).
    Close,
}

/// Runs one command and appends its reply to `out`. `info` is called only by INFO.
pub fn execute(
    db: &mut Db,
    session: &mut Session,
    args: &[Cow<'_, [u8]>],
    out: &mut Vec<u8>,
    info: &dyn Fn() -> Info,
) -> After {
    let Some(name) = args.first() else {
        return After::Continue;
    };
    db.stats.commands_processed += 1;
    let mut buf = [0u8; 16];
    let lower: &[u8] = match buf.get_mut(..name.len()) {
        Some(dst) => {
            dst.copy_from_slice(name);
            dst.make_ascii_lowercase();
            dst
        }
        // No supported command is this long.
        None => b"",
    };
    let Some((canonical, arity)) = lookup(lower) else {
        unknown_command(out, args);
        return After::Continue;
    };
    let argc = args.len() as i64;
    if (arity > 0 && argc != arity) || (arity < 0 && argc < -arity) {
        wrong_arity(out, canonical);
        return After::Continue;
    }
    match canonical {
        "ping" => match args.get(1) {
            None => resp::simple(out, "PONG"),
            Some(_) if args.len() > 2 => wrong_arity(out, canonical),
            Some(msg) => resp::bulk(out, msg),
        },
        "echo" => resp::bulk(out, &args[1]),
        "get" => match db.get(&args[1]) {
            Some(v) => resp::bulk(out, v),
            None => resp::null(out),
        },
        "set" => set(db, args, out),
        "del" => {
            let n = args[1..].iter().filter(|k| db.remove(k)).count();
            resp::integer(out, n as i64);
        }
        "exists" => {
            let n = args[1..].iter().filter(|k| db.contains(k)).count();
            resp::integer(out, n as i64);
        }
        "incr" => incr_reply(db, &args[1], Ok(1), out),
        "decr" => incr_reply(db, &args[1], Ok(-1), out),
        "incrby" => incr_reply(db, &args[1], parse_i64(&args[2]).ok_or(NOT_INTEGER), out),
        "decrby" => {
            let delta = parse_i64(&args[2])
                .ok_or(NOT_INTEGER)
                .and_then(|n| n.checked_neg().ok_or("ERR decrement would overflow"));
            incr_reply(db, &args[1], delta, out);
        }
        "mget" => {
            resp::array(out, args.len() - 1);
            for key in &args[1..] {
                match db.get(key) {
                    Some(v) => resp::bulk(out, v),
                    None => resp::null(out),
                }
            }
        }
        "mset" => {
            if args.len() % 2 == 0 {
                wrong_arity(out, canonical);
            } else {
                for pair in args[1..].chunks_exact(2) {
                    db.set(&pair[0], &pair[1]);
                }
                resp::simple(out, "OK");
            }
        }
        "dbsize" => resp::integer(out, db.len() as i64),
        "flushall" | "flushdb" => match args.get(1) {
            None => flush(db, out),
            Some(mode) if args.len() == 2 && is_one_of(mode, &["async", "sync"]) => flush(db, out),
            Some(_) => resp::error(out, SYNTAX),
        },
        "info" => {
            let text = info_text(&info(), db);
            resp::bulk(out, text.as_bytes());
        }
        // redis-cli and client libraries probe COMMAND / COMMAND DOCS for hints; an empty
        // list makes them fall back to their built-in tables.
        "command" => resp::array(out, 0),
        "config" => config(args, out),
        "select" => match parse_i64(&args[1]) {
            Some(0) => resp::simple(out, "OK"),
            Some(_) => resp::error(out, "ERR DB index is out of range"),
            None => resp::error(out, NOT_INTEGER),
        },
        "client" => client(session, args, out),
        "debug" => debug(db, args, out),
        "quit" => {
            resp::simple(out, "OK");
            return After::Close;
        }
        _ => unknown_command(out, args),
    }
    After::Continue
}

/// Canonical name and Redis arity (N: exactly N arguments including the name; -N: at least N).
fn lookup(lower: &[u8]) -> Option<(&'static str, i64)> {
    const TABLE: &[(&str, i64)] = &[
        ("get", 2),
        ("set", -3),
        ("ping", -1),
        ("incr", 2),
        ("decr", 2),
        ("incrby", 3),
        ("decrby", 3),
        ("mget", -2),
        ("mset", -3),
        ("del", -2),
        ("exists", -2),
        ("echo", 2),
        ("dbsize", 1),
        ("flushall", -1),
        ("flushdb", -1),
        ("info", -1),
        ("command", -1),
        ("config", -2),
        ("select", 2),
        ("client", -2),
        ("quit", -1),
        ("debug", -2),
    ];
    TABLE
        .iter()
        .find(|(name, _)| name.as_bytes() == lower)
        .copied()
}

fn is_one_of(arg: &[u8], options: &[&str]) -> bool {
    options
        .iter()
        .any(|o| arg.eq_ignore_ascii_case(o.as_bytes()))
}

fn wrong_arity(out: &mut Vec<u8>, name: &str) {
    resp::error(
        out,
        &format!("ERR wrong number of arguments for '{name}' command"),
    );
}

/// Redis 7's message: the name and the first arguments, each cut to fit 128 characters.
fn unknown_command(out: &mut Vec<u8>, args: &[Cow<'_, [u8]>]) {
    let name = String::from_utf8_lossy(&args[0]);
    let mut shown = String::new();
    for arg in &args[1..] {
        if shown.len() >= 128 {
            break;
        }
        let room = 128 - shown.len();
        let arg = String::from_utf8_lossy(&arg[..arg.len().min(room)]);
        shown.push('\'');
        shown.push_str(&arg);
        shown.push_str("' ");
    }
    let name: String = name.chars().take(128).collect();
    resp::error(
        out,
        &format!("ERR unknown command '{name}', with args beginning with: {shown}"),
    );
}

fn set(db: &mut Db, args: &[Cow<'_, [u8]>], out: &mut Vec<u8>) {
    let (mut nx, mut xx, mut get) = (false, false, false);
    for opt in &args[3..] {
        if opt.eq_ignore_ascii_case(b"nx") && !xx {
            nx = true;
        } else if opt.eq_ignore_ascii_case(b"xx") && !nx {
            xx = true;
        } else if opt.eq_ignore_ascii_case(b"get") {
            get = true;
        } else if opt.eq_ignore_ascii_case(b"keepttl") {
            // Keys never expire here, so there is never a TTL to keep.
        } else if is_one_of(opt, &["ex", "px", "exat", "pxat"]) {
            resp::error(out, NO_EXPIRY);
            return;
        } else {
            resp::error(out, SYNTAX);
            return;
        }
    }
    let (key, value) = (&args[1], &args[2]);
    let exists = db.contains(key);
    if get {
        if exists {
            db.stats.keyspace_hits += 1;
        } else {
            db.stats.keyspace_misses += 1;
        }
    }
    if (nx && exists) || (xx && !exists) {
        if get {
            // NX + GET on an existing key, or XX + GET on a missing one: report the current
            // value (nil when missing) and change nothing, as Redis does.
            match db.get_mut(key) {
                Some(v) => resp::bulk(out, v),
                None => resp::null(out),
            }
        } else {
            resp::null(out);
        }
        return;
    }
    let old = db.set(key, value);
    match (get, old) {
        (false, _) => resp::simple(out, "OK"),
        (true, Some(old)) => resp::bulk(out, &old),
        (true, None) => resp::null(out),
    }
}

fn incr_reply(db: &mut Db, key: &[u8], delta: Result<i64, &str>, out: &mut Vec<u8>) {
    match delta.and_then(|d| incr_by(db, key, d)) {
        Ok(n) => resp::integer(out, n),
        Err(msg) => resp::error(out, msg),
    }
}

fn incr_by(db: &mut Db, key: &[u8], delta: i64) -> Result<i64, &'static str> {
    match db.get_mut(key) {
        Some(value) => {
            let current = parse_i64(value).ok_or(NOT_INTEGER)?;
            let new = current.checked_add(delta).ok_or(OVERFLOW)?;
            value.clear();
            push_i64(value, new);
            Ok(new)
        }
        None => {
            let mut value = Vec::with_capacity(20);
            push_i64(&mut value, delta);
            db.insert(key.to_vec(), value);
            Ok(delta)
        }
    }
}

/// `DEBUG POPULATE count [prefix] [size]`, as Redis has it: keys `prefix:0` .. `prefix:N-1`
/// (prefix `key`) with values `value:I`, padded with zero bytes or cut to `size` when given.
/// Existing keys are left alone.
fn debug(db: &mut Db, args: &[Cow<'_, [u8]>], out: &mut Vec<u8>) {
    if !args[1].eq_ignore_ascii_case(b"populate") {
        resp::error(out, "ERR DEBUG subcommand must be POPULATE");
        return;
    }
    if !(3..=5).contains(&args.len()) {
        wrong_arity(out, "debug|populate");
        return;
    }
    let Some(count) = parse_i64(&args[2]).and_then(|n| u64::try_from(n).ok()) else {
        resp::error(out, "ERR count should be a non-negative integer");
        return;
    };
    let prefix = args.get(3).map_or(&b"key"[..], |p| p.as_ref());
    let size = match args
        .get(4)
        .map(|a| parse_i64(a).and_then(|n| usize::try_from(n).ok()))
    {
        None => None,
        Some(Some(n)) => Some(n),
        Some(None) => {
            resp::error(out, "ERR size should be a non-negative integer");
            return;
        }
    };
    db.reserve(usize::try_from(count).unwrap_or(0));
    let mut key = Vec::with_capacity(prefix.len() + 21);
    for i in 0..count {
        key.clear();
        key.extend_from_slice(prefix);
        key.push(b':');
        push_i64(&mut key, i as i64);
        if db.contains(&key) {
            continue;
        }
        let mut value = Vec::with_capacity(size.unwrap_or(26));
        value.extend_from_slice(b"value:");
        push_i64(&mut value, i as i64);
        if let Some(n) = size {
            value.resize(n, 0);
        }
        db.insert(key.clone(), value);
    }
    resp::simple(out, "OK");
}

fn flush(db: &mut Db, out: &mut Vec<u8>) {
    db.clear();
    resp::simple(out, "OK");
}

/// Only `CONFIG GET`, for the two parameters redis-benchmark reads at start-up (it warns,
/// but keeps going, when they are missing).
fn config(args: &[Cow<'_, [u8]>], out: &mut Vec<u8>) {
    const PARAMS: &[(&str, &str)] = &[("save", ""), ("appendonly", "no"), ("databases", "1")];
    if !args[1].eq_ignore_ascii_case(b"get") {
        let sub = String::from_utf8_lossy(&args[1]);
        let sub: String = sub.chars().take(128).collect();
        resp::error(
            out,
            &format!("ERR unknown subcommand '{sub}'. Try CONFIG HELP."),
        );
        return;
    }
    if args.len() < 3 {
        wrong_arity(out, "config|get");
        return;
    }
    let matched: Vec<(&str, &str)> = PARAMS
        .iter()
        .filter(|(name, _)| {
            args[2..]
                .iter()
                .any(|pat| pat.as_ref() == b"*" || pat.eq_ignore_ascii_case(name.as_bytes()))
        })
        .copied()
        .collect();
    resp::array(out, matched.len() * 2);
    for (name, value) in matched {
        resp::bulk(out, name.as_bytes());
        resp::bulk(out, value.as_bytes());
    }
}

/// Just enough of CLIENT for client libraries that name their connections on connect.
fn client(session: &mut Session, args: &[Cow<'_, [u8]>], out: &mut Vec<u8>) {
    if args[1].eq_ignore_ascii_case(b"setname") {
        if args.len() != 3 {
            wrong_arity(out, "client|setname");
        } else if !valid_client_name(&args[2]) {
            resp::error(
                out,
                "ERR Client names cannot contain spaces, newlines or special characters.",
            );
        } else {
            // Validated as printable ASCII just above, so this is lossless.
            let name = String::from_utf8_lossy(&args[2]).into_owned();
            // As in Redis, an empty name removes the name.
            session.name = (!name.is_empty()).then_some(name);
            resp::simple(out, "OK");
        }
    } else if args[1].eq_ignore_ascii_case(b"setinfo") {
        resp::simple(out, "OK");
    } else if args[1].eq_ignore_ascii_case(b"getname") {
        match &session.name {
            Some(name) => resp::bulk(out, name.as_bytes()),
            None => resp::null(out),
        }
    } else {
        let sub = String::from_utf8_lossy(&args[1]);
        let sub: String = sub.chars().take(128).collect();
        resp::error(
            out,
            &format!("ERR unknown subcommand '{sub}'. Try CLIENT HELP."),
        );
    }
}

/// INFO's body: `field:value` lines with `\r\n` endings, in sections like Redis.
fn info_text(info: &Info, db: &Db) -> String {
    let restored = info
        .restored_from
        .map_or_else(|| "none".to_owned(), |v| v.to_string());
    let keys = db.len();
    let mut text = format!(
        "# Server\r\n\
         kv_server_version:{version}\r\n\
         redis_mode:standalone\r\n\
         process_id:{pid}\r\n\
         baton_generation:{generation}\r\n\
         kv_schema:{schema}\r\n\
         kv_restored_from_schema:{restored}\r\n\
         uptime_in_seconds:{uptime}\r\n\
         \r\n\
         # Clients\r\n\
         connected_clients:{clients}\r\n\
         \r\n\
         # Stats\r\n\
         total_connections_received:{total_conn}\r\n\
         total_commands_processed:{commands}\r\n\
         keyspace_hits:{hits}\r\n\
         keyspace_misses:{misses}\r\n\
         \r\n\
         # Keyspace\r\n\
         keys:{keys}\r\n",
        version = env!("CARGO_PKG_VERSION"),
        pid = info.pid,
        generation = info.generation,
        schema = info.schema,
        uptime = info.uptime_secs,
        clients = info.connected_clients,
        total_conn = info.total_connections,
        commands = db.stats.commands_processed,
        hits = db.stats.keyspace_hits,
        misses = db.stats.keyspace_misses,
    );
    if !db.is_empty() {
        text.push_str(&format!("db0:keys={keys},expires=0,avg_ttl=0\r\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_info() -> Info {
        Info {
            pid: 4242,
            generation: 7,
            schema: 2,
            restored_from: Some(1),
            uptime_secs: 3,
            connected_clients: 5,
            total_connections: 9,
        }
    }

    /// Runs one command given as words and returns the raw reply.
    fn run(db: &mut Db, words: &[&str]) -> String {
        let args: Vec<Cow<'_, [u8]>> = words.iter().map(|w| Cow::Borrowed(w.as_bytes())).collect();
        let mut out = Vec::new();
        execute(db, &mut Session::default(), &args, &mut out, &test_info);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn ping_and_echo() {
        let mut db = Db::new();
        assert_eq!(run(&mut db, &["PING"]), "+PONG\r\n");
        assert_eq!(run(&mut db, &["ping", "hi"]), "$2\r\nhi\r\n");
        assert_eq!(
            run(&mut db, &["ping", "a", "b"]),
            "-ERR wrong number of arguments for 'ping' command\r\n"
        );
        assert_eq!(run(&mut db, &["EcHo", "x y"]), "$3\r\nx y\r\n");
    }

    #[test]
    fn debug_populate_fills_like_redis_and_keeps_existing_keys() {
        let mut db = Db::new();
        assert_eq!(run(&mut db, &["SET", "key:1", "mine"]), "+OK\r\n");
        assert_eq!(run(&mut db, &["DEBUG", "POPULATE", "3"]), "+OK\r\n");
        assert_eq!(run(&mut db, &["GET", "key:0"]), "$7\r\nvalue:0\r\n");
        assert_eq!(run(&mut db, &["GET", "key:1"]), "$4\r\nmine\r\n");
        assert_eq!(
            run(&mut db, &["debug", "populate", "2", "big", "10"]),
            "+OK\r\n"
        );
        assert_eq!(run(&mut db, &["GET", "big:1"]), "$10\r\nvalue:1\0\0\0\r\n");
        assert_eq!(
            run(&mut db, &["DEBUG", "POPULATE", "1", "cut", "3"]),
            "+OK\r\n"
        );
        assert_eq!(run(&mut db, &["GET", "cut:0"]), "$3\r\nval\r\n");
        assert_eq!(run(&mut db, &["DBSIZE"]), ":6\r\n");
        for (bad, want) in [
            (&["DEBUG", "POPULATE", "-1"][..], "count should be"),
            (&["DEBUG", "POPULATE", "1", "p", "x"], "size should be"),
            (&["DEBUG", "SLEEP", "1"], "POPULATE"),
            (&["DEBUG", "POPULATE"], "wrong number"),
        ] {
            let got = run(&mut db, bad);
            assert!(
                got.starts_with("-ERR") && got.contains(want),
                "{bad:?}: {got}"
            );
        }
    }

    #[test]
    fn get_set_del_exists() {
        let mut db = Db::new();
        assert_eq!(run(&mut db, &["GET", "k"]), "$-1\r\n");
        assert_eq!(run(&mut db, &["SET", "k", "v"]), "+OK\r\n");
        assert_eq!(run(&mut db, &["GET", "k"]), "$1\r\nv\r\n");
        assert_eq!(run(&mut db, &["SET", "k2", ""]), "+OK\r\n");
        assert_eq!(run(&mut db, &["GET", "k2"]), "$0\r\n\r\n");
        assert_eq!(run(&mut db, &["EXISTS", "k", "k", "nope", "k2"]), ":3\r\n");
        assert_eq!(run(&mut db, &["DEL", "k", "nope", "k"]), ":1\r\n");
        assert_eq!(run(&mut db, &["DBSIZE"]), ":1\r\n");
        assert_eq!(db.stats.keyspace_hits, 2);
        assert_eq!(db.stats.keyspace_misses, 1);
        assert_eq!(db.stats.commands_processed, 8);
    }

    #[test]
    fn set_options() {
        let mut db = Db::new();
        assert_eq!(run(&mut db, &["SET", "k", "1", "XX"]), "$-1\r\n");
        assert_eq!(run(&mut db, &["GET", "k"]), "$-1\r\n");
        assert_eq!(run(&mut db, &["SET", "k", "1", "nx"]), "+OK\r\n");
        assert_eq!(run(&mut db, &["SET", "k", "2", "NX"]), "$-1\r\n");
        assert_eq!(run(&mut db, &["SET", "k", "3", "XX", "GET"]), "$1\r\n1\r\n");
        assert_eq!(run(&mut db, &["SET", "k", "4", "NX", "GET"]), "$1\r\n3\r\n");
        assert_eq!(run(&mut db, &["GET", "k"]), "$1\r\n3\r\n");
        assert_eq!(run(&mut db, &["SET", "new", "v", "GET"]), "$-1\r\n");
        assert_eq!(run(&mut db, &["SET", "k", "5", "KEEPTTL"]), "+OK\r\n");
        assert_eq!(
            run(&mut db, &["SET", "k", "1", "NX", "XX"]),
            "-ERR syntax error\r\n"
        );
        assert_eq!(
            run(&mut db, &["SET", "k", "1", "BOGUS"]),
            "-ERR syntax error\r\n"
        );
        assert_eq!(
            run(&mut db, &["SET", "k", "1", "EX", "10"]),
            format!("-{NO_EXPIRY}\r\n")
        );
        assert_eq!(run(&mut db, &["GET", "k"]), "$1\r\n5\r\n");
        assert_eq!(
            run(&mut db, &["SET", "k"]),
            "-ERR wrong number of arguments for 'set' command\r\n"
        );
    }

    #[test]
    fn incr_family() {
        let mut db = Db::new();
        assert_eq!(run(&mut db, &["INCR", "n"]), ":1\r\n");
        assert_eq!(run(&mut db, &["INCRBY", "n", "41"]), ":42\r\n");
        assert_eq!(run(&mut db, &["DECR", "n"]), ":41\r\n");
        assert_eq!(run(&mut db, &["DECRBY", "n", "50"]), ":-9\r\n");
        assert_eq!(run(&mut db, &["GET", "n"]), "$2\r\n-9\r\n");
        assert_eq!(run(&mut db, &["DECRBY", "fresh", "5"]), ":-5\r\n");

        run(&mut db, &["SET", "s", "abc"]);
        assert_eq!(run(&mut db, &["INCR", "s"]), format!("-{NOT_INTEGER}\r\n"));
        run(&mut db, &["SET", "s", " 1"]);
        assert_eq!(run(&mut db, &["INCR", "s"]), format!("-{NOT_INTEGER}\r\n"));
        assert_eq!(
            run(&mut db, &["INCRBY", "n", "x"]),
            format!("-{NOT_INTEGER}\r\n")
        );
        assert_eq!(
            run(&mut db, &["INCRBY", "n", "99999999999999999999"]),
            format!("-{NOT_INTEGER}\r\n")
        );

        run(&mut db, &["SET", "big", &i64::MAX.to_string()]);
        assert_eq!(run(&mut db, &["INCR", "big"]), format!("-{OVERFLOW}\r\n"));
        assert_eq!(
            run(&mut db, &["GET", "big"]),
            format!("$19\r\n{}\r\n", i64::MAX)
        );
        assert_eq!(
            run(&mut db, &["DECRBY", "n", &i64::MIN.to_string()]),
            "-ERR decrement would overflow\r\n"
        );
        assert_eq!(
            run(&mut db, &["INCR"]),
            "-ERR wrong number of arguments for 'incr' command\r\n"
        );
        assert_eq!(
            run(&mut db, &["INCRBY", "n"]),
            "-ERR wrong number of arguments for 'incrby' command\r\n"
        );
    }

    #[test]
    fn mget_mset() {
        let mut db = Db::new();
        assert_eq!(run(&mut db, &["MSET", "a", "1", "b", "2"]), "+OK\r\n");
        assert_eq!(
            run(&mut db, &["MGET", "a", "x", "b"]),
            "*3\r\n$1\r\n1\r\n$-1\r\n$1\r\n2\r\n"
        );
        assert_eq!(
            run(&mut db, &["MSET", "a", "1", "b"]),
            "-ERR wrong number of arguments for 'mset' command\r\n"
        );
        assert_eq!(
            run(&mut db, &["MGET"]),
            "-ERR wrong number of arguments for 'mget' command\r\n"
        );
    }

    #[test]
    fn flush_select_quit_command_config() {
        let mut db = Db::new();
        run(&mut db, &["SET", "a", "1"]);
        assert_eq!(run(&mut db, &["FLUSHALL", "ASYNC"]), "+OK\r\n");
        assert_eq!(run(&mut db, &["DBSIZE"]), ":0\r\n");
        assert_eq!(run(&mut db, &["FLUSHDB", "later"]), "-ERR syntax error\r\n");
        assert_eq!(run(&mut db, &["SELECT", "0"]), "+OK\r\n");
        assert_eq!(
            run(&mut db, &["SELECT", "1"]),
            "-ERR DB index is out of range\r\n"
        );
        assert_eq!(
            run(&mut db, &["SELECT", "x"]),
            format!("-{NOT_INTEGER}\r\n")
        );
        assert_eq!(run(&mut db, &["COMMAND", "DOCS"]), "*0\r\n");
        assert_eq!(
            run(&mut db, &["CONFIG", "GET", "save"]),
            "*2\r\n$4\r\nsave\r\n$0\r\n\r\n"
        );
        assert_eq!(
            run(&mut db, &["CONFIG", "GET", "appendonly"]),
            "*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n"
        );
        assert_eq!(run(&mut db, &["CONFIG", "GET", "maxmemory"]), "*0\r\n");
        assert_eq!(
            run(&mut db, &["CONFIG", "SET", "x", "y"]),
            "-ERR unknown subcommand 'SET'. Try CONFIG HELP.\r\n"
        );
        assert_eq!(run(&mut db, &["CLIENT", "SETNAME", "me"]), "+OK\r\n");

        let args = [Cow::Borrowed(&b"QUIT"[..])];
        let mut out = Vec::new();
        assert_eq!(
            execute(
                &mut db,
                &mut Session::default(),
                &args,
                &mut out,
                &test_info
            ),
            After::Close
        );
        assert_eq!(out, b"+OK\r\n");
    }

    /// Runs commands given as words on one session; returns the raw replies.
    fn run_in(db: &mut Db, session: &mut Session, words: &[&str]) -> String {
        let args: Vec<Cow<'_, [u8]>> = words.iter().map(|w| Cow::Borrowed(w.as_bytes())).collect();
        let mut out = Vec::new();
        execute(db, session, &args, &mut out, &test_info);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn client_name_lives_in_the_session_and_survives_meta() {
        let mut db = Db::new();
        let mut s = Session::default();
        assert_eq!(run_in(&mut db, &mut s, &["CLIENT", "GETNAME"]), "$-1\r\n");
        assert_eq!(
            run_in(&mut db, &mut s, &["CLIENT", "SETNAME", "worker-7"]),
            "+OK\r\n"
        );
        assert_eq!(
            run_in(&mut db, &mut s, &["client", "getname"]),
            "$8\r\nworker-7\r\n"
        );
        assert_eq!(
            run_in(&mut db, &mut s, &["CLIENT", "SETNAME", "a b"]),
            "-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
        );
        assert_eq!(
            s.name.as_deref(),
            Some("worker-7"),
            "a refused name changes nothing"
        );

        // Hand-over: the next generation rebuilds the same session from the metadata.
        let meta = s.to_meta();
        assert_eq!(meta, serde_json::json!({"name": "worker-7", "db": 0}));
        let mut adopted = Session::from_meta(&meta);
        assert_eq!(adopted, s);
        assert_eq!(
            run_in(&mut db, &mut adopted, &["CLIENT", "GETNAME"]),
            "$8\r\nworker-7\r\n"
        );
        // An empty name clears it; odd or missing metadata gives a default session.
        assert_eq!(
            run_in(&mut db, &mut adopted, &["CLIENT", "SETNAME", ""]),
            "+OK\r\n"
        );
        assert_eq!(adopted.name, None);
        assert_eq!(
            Session::from_meta(&serde_json::Value::Null),
            Session::default()
        );
        assert_eq!(
            Session::from_meta(&serde_json::json!({"name": "has space"})),
            Session::default()
        );
    }

    #[test]
    fn unknown_commands_match_redis_text() {
        let mut db = Db::new();
        assert_eq!(
            run(&mut db, &["FOO", "a", "b"]),
            "-ERR unknown command 'FOO', with args beginning with: 'a' 'b' \r\n"
        );
        assert_eq!(
            run(&mut db, &["averyveryverylongcommandname"]),
            "-ERR unknown command 'averyveryverylongcommandname', with args beginning with: \r\n"
        );
        // Client text containing CR/LF cannot break the reply framing.
        assert_eq!(
            run(&mut db, &["x\r\ny"]),
            "-ERR unknown command 'x  y', with args beginning with: \r\n"
        );
    }

    #[test]
    fn empty_command_is_ignored() {
        let mut db = Db::new();
        let mut out = Vec::new();
        assert_eq!(
            execute(&mut db, &mut Session::default(), &[], &mut out, &test_info),
            After::Continue
        );
        assert!(out.is_empty());
        assert_eq!(db.stats.commands_processed, 0);
    }

    #[test]
    fn info_fields() {
        let mut db = Db::new();
        run(&mut db, &["SET", "a", "1"]);
        let reply = run(&mut db, &["INFO"]);
        let (header, body) = reply.split_once("\r\n").unwrap();
        assert_eq!(header, format!("${}", body.len() - 2));
        for line in [
            "process_id:4242",
            "baton_generation:7",
            "kv_schema:2",
            "kv_restored_from_schema:1",
            "keys:1",
            "connected_clients:5",
            "total_connections_received:9",
            "total_commands_processed:2",
            "db0:keys=1,expires=0,avg_ttl=0",
        ] {
            assert!(
                body.split("\r\n").any(|l| l == line),
                "missing {line:?} in {body:?}"
            );
        }
        // Every line ends in CRLF; no bare LF.
        assert!(!body.replace("\r\n", "").contains('\n'));
    }
}
