//! Traces the structure of a type from its `Deserialize` implementation: a deserializer
//! that answers every request with a small made-up value and records what was asked.
//!
//! One pass deserializes one value, so it sees one variant of each enum it meets. Passes
//! are repeated, each choosing variants not seen yet (and, once an enum is fully seen, its
//! variants in turn, to reach enums nested under later variants), until every enum met
//! is complete and no position is left unknown. Recursive types are cut short: inside a
//! container met twice on the way, options are `None`, sequences and maps empty, and
//! enums take a variant already seen to end.

use std::collections::{BTreeMap, HashSet};

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};

use crate::format::schema::{
    Body, Container, ContainerBody, Node, TypeSchema, MAX_CONTAINERS, MAX_DEPTH, MAX_NODES,
};

/// The shape of one position, as traced.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fmt {
    Unknown,
    /// A primitive: one of the leaf [`Node`]s (no children).
    Leaf(Node),
    Option(Box<Fmt>),
    Seq(Box<Fmt>),
    Map(Box<Fmt>, Box<Fmt>),
    Tuple(Vec<Fmt>),
    Named(&'static str),
}

/// The content of a struct or variant, as traced.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum BodyFmt {
    Unit,
    NewType(Fmt),
    Tuple(Vec<Fmt>),
    Struct(Vec<(&'static str, Fmt)>),
}

/// A traced container.
#[derive(Debug, Clone)]
pub(crate) enum ContainerFmt {
    Struct(BodyFmt),
    /// Variant names in index order, and the content of each variant seen.
    Enum(&'static [&'static str], Vec<Option<BodyFmt>>),
}

/// What tracing found: the root's shape and every container by name.
#[derive(Debug, Default)]
pub(crate) struct Traced {
    pub root: Option<Fmt>,
    /// By Rust type name: the serde name and the content.
    pub containers: BTreeMap<&'static str, (&'static str, ContainerFmt)>,
}

/// Deepest nesting of containers a pass follows.
const MAX_NESTING: usize = 48;
/// Most passes before giving up.
const MAX_PASSES: usize = 2048;

#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl de::Error for Refused {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Refused(msg.to_string())
    }
}

type R<T> = std::result::Result<T, Refused>;

#[derive(Default)]
struct State {
    traced: Traced,
    /// Containers being deserialized, outermost first.
    stack: Vec<&'static str>,
    /// Variants of each enum seen to end without meeting their own enum again.
    ending: BTreeMap<&'static str, HashSet<u32>>,
    /// How often each container was entered in this pass.
    entries: BTreeMap<&'static str, usize>,
    /// The value offered for strings.
    text: &'static str,
    /// The value offered for byte strings.
    bytes: &'static [u8],
    /// Variants of each enum being deserialized on the way (outermost first).
    active: BTreeMap<&'static str, Vec<u32>>,
    pass: usize,
}

impl State {
    fn recursing(&self) -> bool {
        let mut seen = HashSet::new();
        self.stack.iter().any(|n| !seen.insert(*n))
    }

    fn enter(&mut self, name: &'static str) -> R<()> {
        if self.stack.len() >= MAX_NESTING {
            return Err(Refused(format!(
                "containers nested deeper than {MAX_NESTING}"
            )));
        }
        self.stack.push(name);
        *self.entries.entry(name).or_default() += 1;
        Ok(())
    }

    fn entered(&self, name: &'static str) -> usize {
        self.entries.get(name).copied().unwrap_or(0)
    }

    fn leave(&mut self) {
        self.stack.pop();
    }

    /// Records container `key` (its Rust type: generic types used with different
    /// parameters are different containers), shown as `name` (its serde name).
    fn record(&mut self, key: &'static str, name: &'static str, container: ContainerFmt) -> R<()> {
        match self.traced.containers.get_mut(key) {
            None => {
                self.traced.containers.insert(key, (name, container));
                Ok(())
            }
            Some((_, existing)) => merge_container(existing, container, name),
        }
    }

    /// The variant to take of enum `name`: one not seen yet, else (inside recursion) one
    /// known to end, else each in turn.
    fn choose(&self, name: &'static str, count: usize) -> u32 {
        let seen = match self.traced.containers.get(name) {
            Some((_, ContainerFmt::Enum(_, v))) => v.clone(),
            _ => vec![None; count],
        };
        let active = self.active.get(name).map(Vec::as_slice).unwrap_or_default();
        if self.recursing() || !active.is_empty() {
            if let Some(end) = self.ending.get(name) {
                if let Some(i) = (0..count as u32).find(|i| end.contains(i)) {
                    return i;
                }
            }
        }
        let count = count as u32;
        let unseen = |i: &u32| seen.get(*i as usize).is_none_or(Option::is_none);
        (0..count)
            .find(|i| unseen(i) && !active.contains(i))
            .or_else(|| (0..count).find(unseen))
            .or_else(|| {
                (0..count)
                    .map(|i| (i + self.pass as u32) % count)
                    .find(|i| !active.contains(i))
            })
            .unwrap_or(self.pass as u32 % count)
    }

    fn complete(&self) -> bool {
        self.traced.root.as_ref().is_some_and(is_known)
            && self.traced.containers.values().all(|(_, c)| match c {
                ContainerFmt::Struct(b) => body_known(b),
                ContainerFmt::Enum(_, v) => v.iter().all(|b| b.as_ref().is_some_and(body_known)),
            })
    }
}

fn is_known(f: &Fmt) -> bool {
    match f {
        Fmt::Unknown => false,
        Fmt::Option(x) | Fmt::Seq(x) => is_known(x),
        Fmt::Map(k, v) => is_known(k) && is_known(v),
        Fmt::Tuple(items) => items.iter().all(is_known),
        Fmt::Leaf(_) | Fmt::Named(_) => true,
    }
}

fn body_known(b: &BodyFmt) -> bool {
    match b {
        BodyFmt::Unit => true,
        BodyFmt::NewType(f) => is_known(f),
        BodyFmt::Tuple(items) => items.iter().all(is_known),
        BodyFmt::Struct(fields) => fields.iter().all(|(_, f)| is_known(f)),
    }
}

fn merge(into: &mut Fmt, other: Fmt) -> R<()> {
    match (into, other) {
        (_, Fmt::Unknown) => Ok(()),
        (slot @ Fmt::Unknown, other) => {
            *slot = other;
            Ok(())
        }
        (Fmt::Option(a), Fmt::Option(b)) | (Fmt::Seq(a), Fmt::Seq(b)) => merge(a, *b),
        (Fmt::Map(k1, v1), Fmt::Map(k2, v2)) => {
            merge(k1, *k2)?;
            merge(v1, *v2)
        }
        (Fmt::Tuple(a), Fmt::Tuple(b)) if a.len() == b.len() => {
            for (x, y) in a.iter_mut().zip(b) {
                merge(x, y)?;
            }
            Ok(())
        }
        (a, b) if *a == b => Ok(()),
        (a, b) => Err(Refused(format!("inconsistent formats {a:?} and {b:?}"))),
    }
}

fn merge_body(into: &mut BodyFmt, other: BodyFmt) -> R<()> {
    match (into, other) {
        (BodyFmt::Unit, BodyFmt::Unit) => Ok(()),
        (BodyFmt::NewType(a), BodyFmt::NewType(b)) => merge(a, b),
        (BodyFmt::Tuple(a), BodyFmt::Tuple(b)) if a.len() == b.len() => {
            for (x, y) in a.iter_mut().zip(b) {
                merge(x, y)?;
            }
            Ok(())
        }
        (BodyFmt::Struct(a), BodyFmt::Struct(b)) if a.len() == b.len() => {
            for ((n, x), (m, y)) in a.iter_mut().zip(b) {
                if *n != m {
                    return Err(Refused(format!("field {n} then {m}")));
                }
                merge(x, y)?;
            }
            Ok(())
        }
        (a, b) => Err(Refused(format!("inconsistent bodies {a:?} and {b:?}"))),
    }
}

fn merge_container(into: &mut ContainerFmt, other: ContainerFmt, name: &str) -> R<()> {
    match (into, other) {
        (ContainerFmt::Struct(a), ContainerFmt::Struct(b)) => merge_body(a, b),
        (ContainerFmt::Enum(n1, a), ContainerFmt::Enum(n2, b)) if *n1 == n2 => {
            for (x, y) in a.iter_mut().zip(b) {
                match (x.as_mut(), y) {
                    (_, None) => {}
                    (None, Some(y)) => *x = Some(y),
                    (Some(x), Some(y)) => merge_body(x, y)?,
                }
            }
            Ok(())
        }
        _ => Err(Refused(format!("{name} traced as two kinds of container"))),
    }
}

/// The made-up values a pass offers for strings and byte strings. Types whose
/// `Deserialize` parses them (timestamps, UUIDs, addresses) reject the plain ones: the
/// later profiles offer values such types accept.
const PROFILES: [(&str, &[u8]); 3] = [
    ("a", &[]),
    ("1970-01-01T00:00:00Z", &[0; 16]),
    ("00000000-0000-0000-0000-000000000000", &[0; 4]),
];

/// Traces `T`, or says why it cannot be.
pub(crate) fn trace<T: DeserializeOwned>() -> std::result::Result<Traced, String> {
    let mut first_error = None;
    for (text, bytes) in PROFILES {
        match trace_with::<T>(text, bytes) {
            Ok(traced) => return Ok(traced),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_default())
}

fn trace_with<T: DeserializeOwned>(
    text: &'static str,
    bytes: &'static [u8],
) -> std::result::Result<Traced, String> {
    let mut st = State {
        text,
        bytes,
        ..State::default()
    };
    for pass in 0..MAX_PASSES {
        st.pass = pass;
        st.stack.clear();
        st.entries.clear();
        st.active.clear();
        let mut root = Fmt::Unknown;
        T::deserialize(Tracer {
            st: &mut st,
            out: &mut root,
        })
        .map_err(|e| e.0)?;
        match st.traced.root.as_mut() {
            None => st.traced.root = Some(root),
            Some(r) => merge(r, root).map_err(|e| e.0)?,
        }
        if st.complete() {
            return Ok(st.traced);
        }
    }
    Err(format!("incomplete after {MAX_PASSES} passes"))
}

/// The deserializer of one position: records its shape in `out`.
struct Tracer<'a> {
    st: &'a mut State,
    out: &'a mut Fmt,
}

macro_rules! leaf {
    ($($method:ident => $leaf:ident, $visit:ident($value:expr);)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> R<V::Value> {
                *self.out = Fmt::Leaf(Node::$leaf);
                visitor.$visit($value)
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for Tracer<'_> {
    type Error = Refused;

    fn is_human_readable(&self) -> bool {
        false
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> R<V::Value> {
        Err(Refused(
            "a type that needs a self-describing format (deserialize_any)".into(),
        ))
    }

    leaf! {
        deserialize_bool => Bool, visit_bool(false);
        deserialize_i8 => I8, visit_i8(1);
        deserialize_i16 => I16, visit_i16(1);
        deserialize_i32 => I32, visit_i32(1);
        deserialize_i64 => I64, visit_i64(1);
        deserialize_i128 => I128, visit_i128(1);
        deserialize_u8 => U8, visit_u8(1);
        deserialize_u16 => U16, visit_u16(1);
        deserialize_u32 => U32, visit_u32(1);
        deserialize_u64 => U64, visit_u64(1);
        deserialize_u128 => U128, visit_u128(1);
        deserialize_f32 => F32, visit_f32(0.0);
        deserialize_f64 => F64, visit_f64(0.0);
        deserialize_char => Char, visit_char('a');
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> R<V::Value> {
        *self.out = Fmt::Leaf(Node::Str);
        visitor.visit_str(self.st.text)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> R<V::Value> {
        *self.out = Fmt::Leaf(Node::Str);
        visitor.visit_string(self.st.text.to_string())
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> R<V::Value> {
        *self.out = Fmt::Leaf(Node::Bytes);
        visitor.visit_bytes(self.st.bytes)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> R<V::Value> {
        *self.out = Fmt::Leaf(Node::Bytes);
        visitor.visit_byte_buf(self.st.bytes.to_vec())
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> R<V::Value> {
        *self.out = Fmt::Leaf(Node::Unit);
        visitor.visit_unit()
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> R<V::Value> {
        if self.st.recursing() {
            if !matches!(self.out, Fmt::Option(_)) {
                *self.out = Fmt::Option(Box::new(Fmt::Unknown));
            }
            return visitor.visit_none();
        }
        let mut inner = Fmt::Unknown;
        let value = visitor.visit_some(Tracer {
            st: self.st,
            out: &mut inner,
        })?;
        *self.out = Fmt::Option(Box::new(inner));
        Ok(value)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> R<V::Value> {
        let key = std::any::type_name::<V::Value>();
        self.st
            .record(key, name, ContainerFmt::Struct(BodyFmt::Unit))?;
        *self.out = Fmt::Named(key);
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> R<V::Value> {
        let key = std::any::type_name::<V::Value>();
        self.st.enter(key)?;
        let mut inner = Fmt::Unknown;
        let value = visitor.visit_newtype_struct(Tracer {
            st: self.st,
            out: &mut inner,
        });
        self.st.leave();
        let value = value?;
        self.st
            .record(key, name, ContainerFmt::Struct(BodyFmt::NewType(inner)))?;
        *self.out = Fmt::Named(key);
        Ok(value)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> R<V::Value> {
        let left = usize::from(!self.st.recursing());
        let mut access = Elements {
            st: self.st,
            left,
            shapes: Vec::new(),
        };
        let value = visitor.visit_seq(&mut access)?;
        let element = access.shapes.pop().unwrap_or(Fmt::Unknown);
        *self.out = Fmt::Seq(Box::new(element));
        Ok(value)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> R<V::Value> {
        let (value, shapes) = fixed(self.st, len, visitor)?;
        *self.out = Fmt::Tuple(shapes);
        Ok(value)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> R<V::Value> {
        let key = std::any::type_name::<V::Value>();
        self.st.enter(key)?;
        let result = fixed(self.st, len, visitor);
        self.st.leave();
        let (value, shapes) = result?;
        self.st
            .record(key, name, ContainerFmt::Struct(BodyFmt::Tuple(shapes)))?;
        *self.out = Fmt::Named(key);
        Ok(value)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> R<V::Value> {
        let mut access = Entries {
            left: !self.st.recursing(),
            st: self.st,
            key: Fmt::Unknown,
            value: Fmt::Unknown,
        };
        let value = visitor.visit_map(&mut access)?;
        *self.out = Fmt::Map(Box::new(access.key), Box::new(access.value));
        Ok(value)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> R<V::Value> {
        let key = std::any::type_name::<V::Value>();
        self.st.enter(key)?;
        let result = fixed(self.st, fields.len(), visitor);
        self.st.leave();
        let (value, shapes) = result?;
        let body = BodyFmt::Struct(fields.iter().copied().zip(shapes).collect());
        self.st.record(key, name, ContainerFmt::Struct(body))?;
        *self.out = Fmt::Named(key);
        Ok(value)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> R<V::Value> {
        if variants.is_empty() {
            return Err(Refused(format!("enum {name} without variants")));
        }
        let key = std::any::type_name::<V::Value>();
        let index = self.st.choose(key, variants.len());
        let before = self.st.entered(key);
        self.st.enter(key)?;
        self.st.active.entry(key).or_default().push(index);
        let mut body = None;
        let result = visitor.visit_enum(Variant {
            st: self.st,
            index,
            body: &mut body,
        });
        let recursed = self.st.entered(key) > before + 1;
        self.st.leave();
        if let Some(a) = self.st.active.get_mut(key) {
            a.pop();
        }
        let value = result?;
        let mut seen = vec![None; variants.len()];
        seen[index as usize] = body;
        self.st
            .record(key, name, ContainerFmt::Enum(variants, seen))?;
        if !recursed {
            self.st.ending.entry(key).or_default().insert(index);
        }
        *self.out = Fmt::Named(key);
        Ok(value)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, _visitor: V) -> R<V::Value> {
        Err(Refused("an identifier outside an enum".into()))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, _visitor: V) -> R<V::Value> {
        Err(Refused("ignored content".into()))
    }
}

/// Deserializes `len` positions in order (tuples, structs), recording each.
fn fixed<'de, V: Visitor<'de>>(st: &mut State, len: usize, visitor: V) -> R<(V::Value, Vec<Fmt>)> {
    let mut access = Elements {
        st,
        left: len,
        shapes: Vec::new(),
    };
    let value = visitor.visit_seq(&mut access)?;
    let mut shapes = access.shapes;
    shapes.resize(len, Fmt::Unknown);
    Ok((value, shapes))
}

struct Elements<'a> {
    st: &'a mut State,
    left: usize,
    shapes: Vec<Fmt>,
}

impl<'de> SeqAccess<'de> for Elements<'_> {
    type Error = Refused;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> R<Option<T::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let mut shape = Fmt::Unknown;
        let value = seed.deserialize(Tracer {
            st: self.st,
            out: &mut shape,
        })?;
        self.shapes.push(shape);
        Ok(Some(value))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

struct Entries<'a> {
    st: &'a mut State,
    left: bool,
    key: Fmt,
    value: Fmt,
}

impl<'de> MapAccess<'de> for Entries<'_> {
    type Error = Refused;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> R<Option<K::Value>> {
        if !self.left {
            return Ok(None);
        }
        self.left = false;
        seed.deserialize(Tracer {
            st: self.st,
            out: &mut self.key,
        })
        .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> R<V::Value> {
        seed.deserialize(Tracer {
            st: self.st,
            out: &mut self.value,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(usize::from(self.left))
    }
}

struct Variant<'a> {
    st: &'a mut State,
    index: u32,
    body: &'a mut Option<BodyFmt>,
}

impl<'de, 'a> EnumAccess<'de> for Variant<'a> {
    type Error = Refused;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> R<(S::Value, Self)> {
        let id = seed.deserialize(IntoDeserializer::<Refused>::into_deserializer(self.index))?;
        Ok((id, self))
    }
}

impl<'de> VariantAccess<'de> for Variant<'_> {
    type Error = Refused;

    fn unit_variant(self) -> R<()> {
        *self.body = Some(BodyFmt::Unit);
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> R<T::Value> {
        let mut shape = Fmt::Unknown;
        let value = seed.deserialize(Tracer {
            st: self.st,
            out: &mut shape,
        })?;
        *self.body = Some(BodyFmt::NewType(shape));
        Ok(value)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> R<V::Value> {
        let (value, shapes) = fixed(self.st, len, visitor)?;
        *self.body = Some(BodyFmt::Tuple(shapes));
        Ok(value)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> R<V::Value> {
        let (value, shapes) = fixed(self.st, fields.len(), visitor)?;
        *self.body = Some(BodyFmt::Struct(
            fields.iter().copied().zip(shapes).collect(),
        ));
        Ok(value)
    }
}

impl TypeSchema {
    /// Traces `T`'s serde format, or `None` when it cannot be traced: a `Deserialize`
    /// that rejects every value tracing offers, `deserialize_any` (untagged enums,
    /// flattened fields), more variants or nesting than tracing explores.
    pub fn trace<T: DeserializeOwned>() -> Option<Self> {
        let traced = trace::<T>().ok()?;
        let mut builder = Builder {
            schema: TypeSchema {
                nodes: Vec::new(),
                containers: Vec::new(),
            },
            index: BTreeMap::new(),
            traced: &traced,
        };
        builder.node(traced.root.as_ref()?, 0)?;
        let schema = builder.schema;
        schema.validate().ok()?;
        Some(schema)
    }
}

/// Turns a traced format into the flat description.
struct Builder<'a> {
    schema: TypeSchema,
    index: BTreeMap<&'static str, u32>,
    traced: &'a Traced,
}

impl Builder<'_> {
    fn push(&mut self, node: Node) -> Option<u32> {
        if self.schema.nodes.len() >= MAX_NODES {
            return None;
        }
        self.schema.nodes.push(node);
        Some(self.schema.nodes.len() as u32 - 1)
    }

    fn nodes(&mut self, formats: &[Fmt], depth: usize) -> Option<Vec<u32>> {
        formats.iter().map(|f| self.node(f, depth)).collect()
    }

    fn node(&mut self, format: &Fmt, depth: usize) -> Option<u32> {
        if depth > MAX_DEPTH {
            return None;
        }
        let d = depth + 1;
        let node = match format {
            Fmt::Unknown => return None,
            Fmt::Named(name) => Node::Named(self.container(name, d)?),
            Fmt::Leaf(leaf) => leaf.clone(),
            Fmt::Option(inner) => Node::Option(self.node(inner, d)?),
            Fmt::Seq(inner) => Node::Seq(self.node(inner, d)?),
            Fmt::Map(key, value) => Node::Map(self.node(key, d)?, self.node(value, d)?),
            // Arrays (`[T; N]`) are tuples of one type to serde; long ones are kept short.
            Fmt::Tuple(items) if items.len() > 4 && items.iter().all(|i| i == &items[0]) => {
                Node::Array(self.node(&items[0], d)?, items.len() as u64)
            }
            Fmt::Tuple(items) => Node::Tuple(self.nodes(items, d)?),
        };
        self.push(node)
    }

    fn body(&mut self, body: &BodyFmt, depth: usize) -> Option<Body> {
        Some(match body {
            BodyFmt::Unit => Body::Unit,
            BodyFmt::NewType(f) => Body::NewType(self.node(f, depth)?),
            BodyFmt::Tuple(fs) => Body::Tuple(self.nodes(fs, depth)?),
            BodyFmt::Struct(fields) => {
                let mut out = Vec::with_capacity(fields.len());
                for (name, f) in fields {
                    out.push((name.to_string(), self.node(f, depth)?));
                }
                Body::Struct(out)
            }
        })
    }

    fn container(&mut self, name: &'static str, depth: usize) -> Option<u32> {
        if let Some(i) = self.index.get(name) {
            return Some(*i);
        }
        if self.schema.containers.len() >= MAX_CONTAINERS {
            return None;
        }
        let at = self.schema.containers.len() as u32;
        self.index.insert(name, at);
        self.schema.containers.push(Container {
            name: name.to_string(),
            body: ContainerBody::Struct(Body::Unit),
        });
        let (display, content) = self.traced.containers.get(name)?;
        self.schema.containers[at as usize].name = display.to_string();
        let body = match content {
            ContainerFmt::Struct(body) => ContainerBody::Struct(self.body(body, depth)?),
            ContainerFmt::Enum(names, variants) => {
                let mut out = Vec::with_capacity(variants.len());
                for (index, (name, body)) in names.iter().zip(variants).enumerate() {
                    let body = self.body(body.as_ref()?, depth)?;
                    out.push((index as u32, name.to_string(), body));
                }
                ContainerBody::Enum(out)
            }
        };
        self.schema.containers[at as usize].body = body;
        Some(at)
    }
}
