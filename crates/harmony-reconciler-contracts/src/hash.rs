//! Spec hashes: short, stable fingerprints of a score.
//!
//! The hash is SHA-256 over a canonical JSON form (object keys sorted, no
//! whitespace), truncated to 64 bits and written as 16 hex digits. Canonicalizing
//! here, instead of relying on serde_json's map ordering, keeps the hash identical
//! whichever crate features the writer and reader were built with.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct SpecHash(String);

impl SpecHash {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Wraps a hash read back from a label or a status report.
    pub fn from_reported(s: impl Into<String>) -> Self {
        Self(s.into())
    }
}

impl fmt::Display for SpecHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Hash of any JSON value, in canonical form.
pub fn spec_hash_of_value(value: &Value) -> SpecHash {
    let mut buf = Vec::with_capacity(256);
    write_canonical(value, &mut buf);
    let digest = Sha256::digest(&buf);
    let mut hex = String::with_capacity(16);
    for b in &digest[..8] {
        hex.push_str(&format!("{b:02x}"));
    }
    SpecHash(hex)
}

/// Hash of anything serializable (a service spec, say).
pub fn spec_hash_of<T: Serialize>(value: &T) -> SpecHash {
    spec_hash_of_value(&serde_json::to_value(value).unwrap_or(Value::Null))
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(&Value::String(k.clone()), out);
                out.push(b':');
                write_canonical(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}
