//! Values as JSON, read and written through a recorded [`TypeSchema`]: stored state
//! becomes readable without the program's types (`rockstate state dump`), and keys typed
//! on a command line become their stored bytes (`rockstate state get`).
//!
//! The JSON form is serde_json's form of the same Rust value: structs are objects, enums
//! are `"Variant"` or `{"Variant": content}`, options are `null` or the value, maps with
//! string keys are objects (other maps are arrays of `[key, value]`), integers beyond
//! 64 bits are strings. The bytes are those of [`crate::codec`] (bincode, big-endian,
//! variable-length integers).

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::format::schema::{Body, ContainerBody, Node, TypeSchema, MAX_DEPTH};

const WHAT: &str = "stored value";

impl TypeSchema {
    /// Decodes one value from the front of `bytes`; returns it and the bytes used.
    ///
    /// Errors: `Corrupt` when the bytes do not hold a value of this type (truncated, a
    /// bad tag or UTF-8, nesting deeper than [`MAX_DEPTH`], more elements than the input
    /// could hold).
    pub fn decode_json(&self, bytes: &[u8]) -> Result<(Value, usize)> {
        let mut r = Reader {
            schema: self,
            bytes,
            at: 0,
            budget: bytes.len().saturating_mul(16).saturating_add(1024),
        };
        let v = r.node(self.root(), 0)?;
        Ok((v, r.at))
    }

    /// Encodes `value` (in the JSON form described in the module) as this type's bytes.
    ///
    /// Errors: `InvalidArgument` naming what does not fit the type.
    pub fn encode_json(&self, value: &Value) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        Writer { schema: self }.node(self.root(), value, &mut out, 0)?;
        Ok(out)
    }
}

struct Reader<'a> {
    schema: &'a TypeSchema,
    bytes: &'a [u8],
    at: usize,
    /// Elements still allowed: a hostile length claim of zero-sized elements must end.
    budget: usize,
}

fn corrupt(detail: impl Into<String>) -> Error {
    Error::corrupt(WHAT, detail.into())
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(|| corrupt(format!("truncated at byte {}", self.at)))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// bincode's variable-length unsigned integer: one byte below 251, else a marker
    /// (251: u16, 252: u32, 253: u64, 254: u128) and the big-endian value.
    fn varint(&mut self) -> Result<u128> {
        Ok(match self.byte()? {
            b @ 0..=250 => u128::from(b),
            251 => u128::from(u16::from_be_bytes(self.fixed()?)),
            252 => u128::from(u32::from_be_bytes(self.fixed()?)),
            253 => u128::from(u64::from_be_bytes(self.fixed()?)),
            254 => u128::from_be_bytes(self.fixed()?),
            b => return Err(corrupt(format!("bad integer marker {b}"))),
        })
    }

    fn unsigned(&mut self, max: u128) -> Result<u128> {
        let v = self.varint()?;
        if v > max {
            return Err(corrupt(format!("{v} is out of range")));
        }
        Ok(v)
    }

    fn signed(&mut self, max: u128) -> Result<i128> {
        let z = self.unsigned(max)?;
        // Zigzag: 0, -1, 1, -2, ...
        Ok(((z >> 1) as i128) ^ -((z & 1) as i128))
    }

    fn len(&mut self) -> Result<usize> {
        let n = self.unsigned(u128::from(u64::MAX))?;
        usize::try_from(n).map_err(|_| corrupt(format!("length {n}")))
    }

    fn spend(&mut self) -> Result<()> {
        self.budget = self
            .budget
            .checked_sub(1)
            .ok_or_else(|| corrupt("more elements than the input can hold"))?;
        Ok(())
    }

    fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec()).map_err(|_| corrupt("a string that is not UTF-8"))
    }

    fn node(&mut self, at: u32, depth: usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            return Err(corrupt(format!("nested deeper than {MAX_DEPTH}")));
        }
        // Every position costs, also those that read no bytes: a description whose
        // fields fan out over empty types cannot make a small input expand without end.
        self.spend()?;
        let d = depth + 1;
        let node = self
            .schema
            .nodes
            .get(at as usize)
            .ok_or_else(|| corrupt("the type description refers to a missing node"))?;
        Ok(match node {
            Node::Unit => Value::Null,
            Node::Bool => match self.byte()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(corrupt(format!("bool {b}"))),
            },
            Node::U8 => Value::from(self.byte()?),
            Node::I8 => Value::from(self.byte()? as i8),
            Node::U16 => int_u(self.unsigned(u128::from(u16::MAX))?),
            Node::U32 => int_u(self.unsigned(u128::from(u32::MAX))?),
            Node::U64 => int_u(self.unsigned(u128::from(u64::MAX))?),
            Node::U128 => int_u(self.varint()?),
            Node::I16 => int_i(self.signed(u128::from(u16::MAX))?),
            Node::I32 => int_i(self.signed(u128::from(u32::MAX))?),
            Node::I64 => int_i(self.signed(u128::from(u64::MAX))?),
            Node::I128 => {
                let z = self.varint()?;
                let v = ((z >> 1) as i128) ^ -((z & 1) as i128);
                int_i(v)
            }
            // Through the shortest decimal of the f32, so 0.1f32 reads as 0.1.
            Node::F32 => {
                let v = f32::from_be_bytes(self.fixed()?);
                float(v.to_string().parse().unwrap_or(f64::from(v)))
            }
            Node::F64 => float(f64::from_be_bytes(self.fixed()?)),
            Node::Char => {
                let first = self.byte()?;
                let width = match first {
                    0x00..=0x7f => 1,
                    0xc0..=0xdf => 2,
                    0xe0..=0xef => 3,
                    0xf0..=0xf7 => 4,
                    _ => return Err(corrupt("a char that is not UTF-8")),
                };
                let mut buf = vec![first];
                buf.extend_from_slice(self.take(width - 1)?);
                Value::String(
                    String::from_utf8(buf).map_err(|_| corrupt("a char that is not UTF-8"))?,
                )
            }
            Node::Str => Value::String(self.string()?),
            Node::Bytes => {
                let n = self.len()?;
                Value::Array(self.take(n)?.iter().map(|b| Value::from(*b)).collect())
            }
            Node::Option(inner) => match self.byte()? {
                0 => Value::Null,
                1 => self.node(*inner, d)?,
                b => return Err(corrupt(format!("option tag {b}"))),
            },
            Node::Seq(inner) => {
                let n = self.len()?;
                let mut out = Vec::new();
                for _ in 0..n {
                    self.spend()?;
                    out.push(self.node(*inner, d)?);
                }
                Value::Array(out)
            }
            Node::Map(k, v) => {
                let n = self.len()?;
                let string_keys = matches!(self.schema.nodes.get(*k as usize), Some(Node::Str));
                let mut object = Map::new();
                let mut pairs = Vec::new();
                for _ in 0..n {
                    self.spend()?;
                    let key = self.node(*k, d)?;
                    let value = self.node(*v, d)?;
                    match (string_keys, key) {
                        (true, Value::String(s)) => {
                            object.insert(s, value);
                        }
                        (_, key) => pairs.push(Value::Array(vec![key, value])),
                    }
                }
                if string_keys {
                    Value::Object(object)
                } else {
                    Value::Array(pairs)
                }
            }
            Node::Tuple(items) => Value::Array(
                items
                    .iter()
                    .map(|i| self.node(*i, d))
                    .collect::<Result<_>>()?,
            ),
            Node::Array(inner, n) => {
                let mut out = Vec::new();
                for _ in 0..*n {
                    self.spend()?;
                    out.push(self.node(*inner, d)?);
                }
                Value::Array(out)
            }
            Node::Named(c) => {
                let container = self
                    .schema
                    .containers
                    .get(*c as usize)
                    .ok_or_else(|| corrupt("the type description refers to a missing type"))?;
                match &container.body {
                    ContainerBody::Struct(body) => self.body(body, d)?,
                    ContainerBody::Enum(variants) => {
                        let index = self.unsigned(u128::from(u32::MAX))? as u32;
                        let (_, name, body) = variants
                            .iter()
                            .find(|(i, _, _)| *i == index)
                            .ok_or_else(|| {
                                corrupt(format!("enum {} has no variant {index}", container.name))
                            })?;
                        match body {
                            Body::Unit => Value::String(name.clone()),
                            body => {
                                let mut o = Map::new();
                                o.insert(name.clone(), self.body(body, d)?);
                                Value::Object(o)
                            }
                        }
                    }
                }
            }
        })
    }

    fn body(&mut self, body: &Body, depth: usize) -> Result<Value> {
        Ok(match body {
            Body::Unit => Value::Null,
            Body::NewType(n) => self.node(*n, depth)?,
            Body::Tuple(items) => Value::Array(
                items
                    .iter()
                    .map(|i| self.node(*i, depth))
                    .collect::<Result<_>>()?,
            ),
            Body::Struct(fields) => {
                let mut o = Map::new();
                for (name, n) in fields {
                    o.insert(name.clone(), self.node(*n, depth)?);
                }
                Value::Object(o)
            }
        })
    }
}

fn int_u(v: u128) -> Value {
    match u64::try_from(v) {
        Ok(v) => Value::from(v),
        Err(_) => Value::String(v.to_string()),
    }
}

fn int_i(v: i128) -> Value {
    match i64::try_from(v) {
        Ok(v) => Value::from(v),
        Err(_) => Value::String(v.to_string()),
    }
}

fn float(v: f64) -> Value {
    serde_json::Number::from_f64(v)
        .map(Value::Number)
        .unwrap_or_else(|| Value::String(v.to_string()))
}

struct Writer<'a> {
    schema: &'a TypeSchema,
}

fn refused(detail: impl Into<String>) -> Error {
    Error::invalid(detail.into())
}

fn put_varint(out: &mut Vec<u8>, v: u128) {
    if v <= 250 {
        out.push(v as u8);
    } else if let Ok(v) = u16::try_from(v) {
        out.push(251);
        out.extend_from_slice(&v.to_be_bytes());
    } else if let Ok(v) = u32::try_from(v) {
        out.push(252);
        out.extend_from_slice(&v.to_be_bytes());
    } else if let Ok(v) = u64::try_from(v) {
        out.push(253);
        out.extend_from_slice(&v.to_be_bytes());
    } else {
        out.push(254);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

fn as_u128(value: &Value) -> Option<u128> {
    match value {
        Value::Number(n) => n.as_u64().map(u128::from),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_i128(value: &Value) -> Option<i128> {
    match value {
        Value::Number(n) => n.as_i64().map(i128::from),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

impl Writer<'_> {
    fn node(&self, at: u32, value: &Value, out: &mut Vec<u8>, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(refused(format!("nested deeper than {MAX_DEPTH}")));
        }
        let d = depth + 1;
        let node = self
            .schema
            .nodes
            .get(at as usize)
            .ok_or_else(|| refused("the type description refers to a missing node"))?;
        let want = |what: &str| refused(format!("expected {what}, found {value}"));
        match node {
            Node::Unit => {
                if !value.is_null() {
                    return Err(want("null"));
                }
            }
            Node::Bool => out.push(u8::from(value.as_bool().ok_or_else(|| want("a bool"))?)),
            Node::U8 | Node::U16 | Node::U32 | Node::U64 | Node::U128 => {
                let max = match node {
                    Node::U8 => u128::from(u8::MAX),
                    Node::U16 => u128::from(u16::MAX),
                    Node::U32 => u128::from(u32::MAX),
                    Node::U64 => u128::from(u64::MAX),
                    _ => u128::MAX,
                };
                let v = as_u128(value)
                    .filter(|v| *v <= max)
                    .ok_or_else(|| want("an unsigned integer in range"))?;
                if matches!(node, Node::U8) {
                    out.push(v as u8);
                } else {
                    put_varint(out, v);
                }
            }
            Node::I8 | Node::I16 | Node::I32 | Node::I64 | Node::I128 => {
                let (min, max) = match node {
                    Node::I8 => (i128::from(i8::MIN), i128::from(i8::MAX)),
                    Node::I16 => (i128::from(i16::MIN), i128::from(i16::MAX)),
                    Node::I32 => (i128::from(i32::MIN), i128::from(i32::MAX)),
                    Node::I64 => (i128::from(i64::MIN), i128::from(i64::MAX)),
                    _ => (i128::MIN, i128::MAX),
                };
                let v = as_i128(value)
                    .filter(|v| (min..=max).contains(v))
                    .ok_or_else(|| want("an integer in range"))?;
                if matches!(node, Node::I8) {
                    out.push(v as i8 as u8);
                } else {
                    put_varint(out, ((v << 1) ^ (v >> 127)) as u128);
                }
            }
            Node::F32 => {
                let v = value.as_f64().ok_or_else(|| want("a number"))?;
                out.extend_from_slice(&(v as f32).to_be_bytes());
            }
            Node::F64 => {
                let v = value.as_f64().ok_or_else(|| want("a number"))?;
                out.extend_from_slice(&v.to_be_bytes());
            }
            Node::Char => {
                let s = value
                    .as_str()
                    .ok_or_else(|| want("a one-character string"))?;
                let mut chars = s.chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None) => {
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                    _ => return Err(want("a one-character string")),
                }
            }
            Node::Str => {
                let s = value.as_str().ok_or_else(|| want("a string"))?;
                put_varint(out, s.len() as u128);
                out.extend_from_slice(s.as_bytes());
            }
            Node::Bytes => {
                let items = value.as_array().ok_or_else(|| want("an array of bytes"))?;
                put_varint(out, items.len() as u128);
                for b in items {
                    let b = b
                        .as_u64()
                        .and_then(|b| u8::try_from(b).ok())
                        .ok_or_else(|| want("an array of bytes"))?;
                    out.push(b);
                }
            }
            Node::Option(inner) => {
                if value.is_null() {
                    out.push(0);
                } else {
                    out.push(1);
                    self.node(*inner, value, out, d)?;
                }
            }
            Node::Seq(inner) => {
                let items = value.as_array().ok_or_else(|| want("an array"))?;
                put_varint(out, items.len() as u128);
                for item in items {
                    self.node(*inner, item, out, d)?;
                }
            }
            Node::Map(k, v) => match value {
                Value::Object(o) => {
                    put_varint(out, o.len() as u128);
                    for (key, item) in o {
                        self.node(*k, &Value::String(key.clone()), out, d)?;
                        self.node(*v, item, out, d)?;
                    }
                }
                Value::Array(pairs) => {
                    put_varint(out, pairs.len() as u128);
                    for pair in pairs {
                        match pair.as_array().map(Vec::as_slice) {
                            Some([key, item]) => {
                                self.node(*k, key, out, d)?;
                                self.node(*v, item, out, d)?;
                            }
                            _ => return Err(want("[key, value] pairs")),
                        }
                    }
                }
                _ => return Err(want("an object or an array of [key, value] pairs")),
            },
            Node::Tuple(items) => {
                let values = value
                    .as_array()
                    .filter(|a| a.len() == items.len())
                    .ok_or_else(|| want(&format!("an array of {}", items.len())))?;
                for (i, v) in items.iter().zip(values) {
                    self.node(*i, v, out, d)?;
                }
            }
            Node::Array(inner, n) => {
                let values = value
                    .as_array()
                    .filter(|a| a.len() as u64 == *n)
                    .ok_or_else(|| want(&format!("an array of {n}")))?;
                for v in values {
                    self.node(*inner, v, out, d)?;
                }
            }
            Node::Named(c) => {
                let container = self
                    .schema
                    .containers
                    .get(*c as usize)
                    .ok_or_else(|| refused("the type description refers to a missing type"))?;
                match &container.body {
                    ContainerBody::Struct(body) => self.body(body, value, out, d)?,
                    ContainerBody::Enum(variants) => {
                        let (name, content) = match value {
                            Value::String(s) => (s.as_str(), &Value::Null),
                            Value::Object(o) if o.len() == 1 => {
                                let (k, v) = o.iter().next().expect("one entry");
                                (k.as_str(), v)
                            }
                            _ => return Err(want(&format!("a variant of {}", container.name))),
                        };
                        let (index, _, body) =
                            variants.iter().find(|(_, n, _)| n == name).ok_or_else(|| {
                                refused(format!("{} has no variant {name:?}", container.name))
                            })?;
                        put_varint(out, u128::from(*index));
                        self.body(body, content, out, d)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn body(&self, body: &Body, value: &Value, out: &mut Vec<u8>, depth: usize) -> Result<()> {
        match body {
            Body::Unit => Ok(()),
            Body::NewType(n) => self.node(*n, value, out, depth),
            Body::Tuple(items) => {
                let values = value
                    .as_array()
                    .filter(|a| a.len() == items.len())
                    .ok_or_else(|| {
                        refused(format!(
                            "expected an array of {}, found {value}",
                            items.len()
                        ))
                    })?;
                for (i, v) in items.iter().zip(values) {
                    self.node(*i, v, out, depth)?;
                }
                Ok(())
            }
            Body::Struct(fields) => {
                let o = value
                    .as_object()
                    .ok_or_else(|| refused(format!("expected an object, found {value}")))?;
                for (name, n) in fields {
                    let v = o
                        .get(name)
                        .ok_or_else(|| refused(format!("missing field {name:?}")))?;
                    self.node(*n, v, out, depth)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::codec;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Kind {
        Plain,
        Weighted(f64),
        Pair(i16, char),
        Named { label: String, tags: Vec<String> },
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Record {
        id: u64,
        small: u8,
        delta: i64,
        neg: i8,
        wide: u128,
        wider: i128,
        flag: bool,
        name: String,
        maybe: Option<u32>,
        kinds: Vec<Kind>,
        by_name: BTreeMap<String, u16>,
        by_id: HashMap<u32, (bool, String)>,
        digest: [u8; 8],
        unit: (),
        ratio: f32,
    }

    fn sample(i: u64) -> Record {
        Record {
            id: i.wrapping_mul(1_000_003),
            small: (i % 256) as u8,
            delta: -(i as i64) * 70_000,
            neg: -((i % 128) as i8),
            wide: u128::from(i) << 70,
            wider: -(i128::from(i) << 90),
            flag: i.is_multiple_of(2),
            name: format!("n{i}é"),
            maybe: i.is_multiple_of(3).then_some((i as u32).wrapping_mul(300)),
            kinds: vec![
                Kind::Plain,
                Kind::Weighted(i as f64 / 3.0),
                Kind::Pair(-(i as i16), 'ß'),
                Kind::Named {
                    label: "x".repeat(i as usize % 300),
                    tags: vec!["a".into(); i as usize % 4],
                },
            ],
            by_name: (0..i % 5)
                .map(|k| (format!("k{k}"), k as u16 * 999))
                .collect(),
            by_id: (0..i % 3)
                .map(|k| (k as u32 + 70_000, (k % 2 == 0, "v".into())))
                .collect(),
            digest: [i as u8; 8],
            unit: (),
            ratio: 0.5,
        }
    }

    #[test]
    fn json_matches_serde_json_and_round_trips() {
        let schema = TypeSchema::trace::<Record>().unwrap();
        for i in [
            0u64,
            1,
            2,
            250,
            251,
            65_535,
            65_536,
            4_000_000_000,
            9_000_000_000_000,
        ] {
            let value = sample(i);
            let bytes = codec::encode_key(&value).unwrap();
            let (json, used) = schema.decode_json(&bytes).unwrap();
            assert_eq!(used, bytes.len());
            let mut plain = value.clone();
            plain.wide = 0;
            plain.wider = 0;
            let mut expected = serde_json::to_value(&plain).unwrap();
            // Integers beyond 64 bits are strings here.
            expected["wide"] = int_u(value.wide);
            expected["wider"] = int_i(value.wider);
            // Maps with integer keys are [key, value] pairs here.
            let mut pairs: Vec<Value> = value
                .by_id
                .iter()
                .map(|(k, v)| serde_json::json!([k, [v.0, v.1]]))
                .collect();
            let mut got = json["by_id"].as_array().unwrap().clone();
            pairs.sort_by_key(|p| p[0].as_u64());
            got.sort_by_key(|p| p[0].as_u64());
            assert_eq!(got, pairs);
            let mut json_without = json.clone();
            json_without["by_id"] = Value::Null;
            expected["by_id"] = Value::Null;
            assert_eq!(json_without, expected, "value {i}");
            // And back: the same bytes.
            assert_eq!(schema.encode_json(&json).unwrap(), bytes, "value {i}");
        }
    }

    #[test]
    fn damaged_bytes_and_wrong_json_give_typed_errors() {
        let schema = TypeSchema::trace::<Record>().unwrap();
        let bytes = codec::encode_key(&sample(7)).unwrap();
        for cut in 0..bytes.len() {
            let err = schema.decode_json(&bytes[..cut]).unwrap_err();
            assert_eq!(err.kind(), crate::error::ErrorKind::Corrupt);
        }
        // A description fanning out over empty types cannot expand a small input.
        let mut nodes = vec![Node::Unit];
        for i in 0..60u32 {
            nodes.push(Node::Tuple(vec![i, i, i, i]));
        }
        let fan = TypeSchema {
            nodes,
            containers: Vec::new(),
        };
        fan.validate().unwrap();
        assert_eq!(
            fan.decode_json(&[]).unwrap_err().kind(),
            crate::error::ErrorKind::Corrupt
        );
        // A huge claimed length of zero-sized elements ends with an error.
        let units = TypeSchema::trace::<Vec<()>>().unwrap();
        let mut claim = vec![253];
        claim.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(units.decode_json(&claim).is_err());
        let s = TypeSchema::trace::<String>().unwrap();
        assert!(s.decode_json(&[2, 0xff, 0xfe]).is_err());
        let err = schema
            .encode_json(&serde_json::json!({"id": 1}))
            .unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::InvalidArgument);
        let u = TypeSchema::trace::<u8>().unwrap();
        assert!(u.encode_json(&serde_json::json!(256)).is_err());
        assert_eq!(u.encode_json(&serde_json::json!(255)).unwrap(), vec![255]);
    }
}
