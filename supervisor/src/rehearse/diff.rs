//! Comparing two snapshots semantically: JSON values, with the fields an app declares
//! a down-migration drops left out, and the first difference named by its JSON pointer.

use std::fmt;

use serde_json::Value;

/// How two snapshots are compared.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// JSON pointers into the state left out of the comparison (declared drops).
    pub dropped: Vec<String>,
    /// JSON pointers into the state of arrays compared as multisets.
    pub unordered: Vec<String>,
}

/// Where two snapshots first differ.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// JSON pointer into the snapshot (`/state/...`).
    pub path: String,
    /// The value in the first, if there.
    pub before: Option<Value>,
    /// The value in the second, if there.
    pub after: Option<Value>,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.before, &self.after) {
            (Some(b), None) => write!(f, "{} is missing (it was {})", self.path, preview(b)),
            (None, Some(a)) => write!(f, "{} appeared ({})", self.path, preview(a)),
            (Some(b), Some(a)) => {
                write!(f, "{} was {} and is {}", self.path, preview(b), preview(a))
            }
            (None, None) => write!(f, "{} differs", self.path),
        }
    }
}

/// The first difference between snapshots `before` and `after` under `rules`, or
/// `None` when they hold the same state.
pub fn first_difference(before: &Value, after: &Value, rules: &Rules) -> Option<Difference> {
    let (mut b, mut a) = (before.clone(), after.clone());
    for v in [&mut b, &mut a] {
        for p in &rules.dropped {
            remove(v, &format!("/state{p}"));
        }
        for p in &rules.unordered {
            if let Some(Value::Array(items)) = v.pointer_mut(&format!("/state{p}")) {
                items.sort_by_cached_key(|x| x.to_string());
            }
        }
    }
    walk("", &b, &a)
}

fn walk(path: &str, b: &Value, a: &Value) -> Option<Difference> {
    let here = |before: Option<&Value>, after: Option<&Value>| Difference {
        path: if path.is_empty() {
            "/".into()
        } else {
            path.into()
        },
        before: before.cloned(),
        after: after.cloned(),
    };
    match (b, a) {
        (Value::Object(bm), Value::Object(am)) => {
            let mut keys: Vec<&String> = bm.keys().chain(am.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let p = format!("{path}/{}", escape(k));
                match (bm.get(k), am.get(k)) {
                    (Some(x), Some(y)) => walk(&p, x, y),
                    (x, y) => Some(Difference {
                        path: p,
                        before: x.cloned(),
                        after: y.cloned(),
                    }),
                }
            })
        }
        (Value::Array(bv), Value::Array(av)) => (0..bv.len().max(av.len())).find_map(|i| {
            let p = format!("{path}/{i}");
            match (bv.get(i), av.get(i)) {
                (Some(x), Some(y)) => walk(&p, x, y),
                (x, y) => Some(Difference {
                    path: p,
                    before: x.cloned(),
                    after: y.cloned(),
                }),
            }
        }),
        _ if b == a => None,
        _ => Some(here(Some(b), Some(a))),
    }
}

/// Removes what `pointer` names, if it is there.
fn remove(v: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    let key = last.replace("~1", "/").replace("~0", "~");
    match v.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            m.remove(&key);
        }
        Some(Value::Array(items)) => {
            if let Ok(i) = key.parse::<usize>() {
                if i < items.len() {
                    items.remove(i);
                }
            }
        }
        _ => {}
    }
}

/// A JSON pointer token (RFC 6901).
fn escape(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

/// At most 80 characters of `v`.
fn preview(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_the_first_missing_key() {
        let b = json!({"version": 1, "state": {"entries": {"a": "1", "xb": "2", "xc": "3"}}});
        let a = json!({"version": 1, "state": {"entries": {"a": "1"}}});
        let d = first_difference(&b, &a, &Rules::default()).unwrap();
        assert_eq!(d.path, "/state/entries/xb");
        assert_eq!(d.to_string(), "/state/entries/xb is missing (it was \"2\")");
        assert_eq!(first_difference(&b, &b, &Rules::default()), None);
    }

    #[test]
    fn declared_drops_and_unordered_arrays_are_not_differences() {
        let b = json!({"version": 2, "state": {"n": [1, 2, 3], "stats": {"hits": 5}, "k/x": 1}});
        let a = json!({"version": 2, "state": {"n": [3, 1, 2], "stats": {"hits": 0}, "k/x": 1}});
        let strict = first_difference(&b, &a, &Rules::default()).unwrap();
        assert_eq!(strict.path, "/state/n/0");
        let rules = Rules {
            dropped: vec!["/stats".into()],
            unordered: vec!["/n".into()],
        };
        assert_eq!(first_difference(&b, &a, &rules), None);
        let c = json!({"version": 2, "state": {"n": [1, 2, 3], "stats": {}, "k/x": 2}});
        let d = first_difference(&b, &c, &rules).unwrap();
        assert_eq!(d.path, "/state/k~1x");
        assert_eq!(d.to_string(), "/state/k~1x was 1 and is 2");
    }

    #[test]
    fn a_longer_array_and_a_changed_version_are_found() {
        let b = json!({"version": 1, "state": [1]});
        let a = json!({"version": 1, "state": [1, 2]});
        assert_eq!(
            first_difference(&b, &a, &Rules::default())
                .unwrap()
                .to_string(),
            "/state/1 appeared (2)"
        );
        let v2 = json!({"version": 2, "state": [1]});
        assert_eq!(
            first_difference(&b, &v2, &Rules::default()).unwrap().path,
            "/version"
        );
    }
}
