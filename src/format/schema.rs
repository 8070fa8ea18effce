//! The recorded shape of a state's key, namespace and value types: a stable name and a
//! structural description of their serde format, traced from the types themselves.
//!
//! Two types are the same when their structures are: the same primitives in the same
//! places, the same field names in the same order, the same variant names at the same
//! indices. Container names (struct and enum names) do not count, so moving or renaming a
//! type keeps its state; swapping two fields, renaming one or changing its type does not.
//!
//! The description is stored flat (nodes refer to nodes by index, children before
//! parents) so that decoding a hostile description never recurses, and every walk over it
//! is bounded by [`MAX_DEPTH`].

use std::collections::HashSet;
use std::fmt::{self, Write as _};

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Most nodes a recorded description may have.
pub const MAX_NODES: usize = 4096;
/// Most containers (structs and enums) a recorded description may have.
pub const MAX_CONTAINERS: usize = 1024;
/// Deepest nesting any walk over a description (or a value decoded by it) follows.
pub const MAX_DEPTH: usize = 128;
/// Longest name (of a type, field or variant) in a description.
const MAX_NAME_LEN: usize = 512;

/// One node of a structural description. Children are indices of earlier nodes;
/// [`Node::Named`] refers to a container, which may refer back (recursive types).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    /// `()`.
    Unit,
    /// `bool`.
    Bool,
    /// `i8`.
    I8,
    /// `i16`.
    I16,
    /// `i32`.
    I32,
    /// `i64`.
    I64,
    /// `i128`.
    I128,
    /// `u8`.
    U8,
    /// `u16`.
    U16,
    /// `u32`.
    U32,
    /// `u64`.
    U64,
    /// `u128`.
    U128,
    /// `f32`.
    F32,
    /// `f64`.
    F64,
    /// `char`.
    Char,
    /// A string.
    Str,
    /// A byte string.
    Bytes,
    /// `Option` of a node.
    Option(u32),
    /// A sequence of a node.
    Seq(u32),
    /// A map from a node to a node.
    Map(u32, u32),
    /// A tuple.
    Tuple(Vec<u32>),
    /// A fixed-size array of a node.
    Array(u32, u64),
    /// A container, by index.
    Named(u32),
}

/// The body of a struct or of an enum variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// No content.
    Unit,
    /// One unnamed field.
    NewType(u32),
    /// Unnamed fields.
    Tuple(Vec<u32>),
    /// Named fields, in order.
    Struct(Vec<(String, u32)>),
}

/// A struct or an enum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerBody {
    /// A struct.
    Struct(Body),
    /// An enum: its variants by index, each with its name and body.
    Enum(Vec<(u32, String, Body)>),
}

/// A named container of a description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    /// The type's serde name (informative only: it does not take part in comparisons).
    pub name: String,
    /// Its content.
    pub body: ContainerBody,
}

/// The structural description of a type's serde format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeSchema {
    /// Nodes, children before parents; the last one is the type itself.
    pub nodes: Vec<Node>,
    /// Containers referred to by [`Node::Named`].
    pub containers: Vec<Container>,
}

impl TypeSchema {
    /// Index of the root node.
    pub fn root(&self) -> u32 {
        self.nodes.len().saturating_sub(1) as u32
    }

    /// Checks what a description read from storage must satisfy: bounded sizes, children
    /// before parents, container indices in range, bounded nesting.
    ///
    /// Errors: `Corrupt` naming what is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| Err(Error::corrupt("state type description", detail));
        if self.nodes.is_empty() || self.nodes.len() > MAX_NODES {
            return bad(format!("{} nodes", self.nodes.len()));
        }
        if self.containers.len() > MAX_CONTAINERS {
            return bad(format!("{} containers", self.containers.len()));
        }
        let node_ok = |i: u32, before: usize| (i as usize) < before;
        let mut depth = vec![0usize; self.nodes.len()];
        for (at, node) in self.nodes.iter().enumerate() {
            let children: Vec<u32> = match node {
                Node::Option(c) | Node::Seq(c) | Node::Array(c, _) => vec![*c],
                Node::Map(k, v) => vec![*k, *v],
                Node::Tuple(items) => items.clone(),
                Node::Named(c) => {
                    if *c as usize >= self.containers.len() {
                        return bad(format!("node {at} refers to container {c}"));
                    }
                    Vec::new()
                }
                _ => Vec::new(),
            };
            let mut d = 0;
            for c in children {
                if !node_ok(c, at) {
                    return bad(format!("node {at} refers to node {c}"));
                }
                d = d.max(depth[c as usize]);
            }
            depth[at] = d + 1;
            if depth[at] > MAX_DEPTH {
                return bad(format!("nesting deeper than {MAX_DEPTH}"));
            }
        }
        let all = self.nodes.len();
        let check_body = |body: &Body| -> Result<()> {
            let refs: Vec<u32> = match body {
                Body::Unit => Vec::new(),
                Body::NewType(n) => vec![*n],
                Body::Tuple(items) => items.clone(),
                Body::Struct(fields) => {
                    if fields.iter().any(|(name, _)| name.len() > MAX_NAME_LEN) {
                        return Err(Error::corrupt("state type description", "a long name"));
                    }
                    fields.iter().map(|(_, n)| *n).collect()
                }
            };
            if refs.iter().any(|n| !node_ok(*n, all)) {
                return Err(Error::corrupt(
                    "state type description",
                    "a field refers to a missing node",
                ));
            }
            Ok(())
        };
        for c in &self.containers {
            if c.name.len() > MAX_NAME_LEN {
                return bad("a long container name".into());
            }
            match &c.body {
                ContainerBody::Struct(body) => check_body(body)?,
                ContainerBody::Enum(variants) => {
                    let mut seen = HashSet::new();
                    for (index, name, body) in variants {
                        if !seen.insert(*index) || name.len() > MAX_NAME_LEN {
                            return bad(format!("enum {:?}: bad variant {index}", c.name));
                        }
                        check_body(body)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `self` and `other` describe the same serde format (container names aside).
    pub fn same_structure(&self, other: &TypeSchema) -> bool {
        let mut cmp = Comparison {
            a: self,
            b: other,
            assumed: HashSet::new(),
        };
        cmp.nodes(self.root(), other.root(), 0)
    }

    /// A short name: the root container's name, or a description of a built-in type
    /// (`u64`, `String`, `Vec<Order>`, `(u32, String)`, …).
    pub fn name(&self) -> String {
        let mut out = String::new();
        self.write_node(&mut out, self.root(), false, 0);
        out
    }

    /// The whole structure, for messages: `Order { amount: u32, note: String }`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        self.write_node(&mut out, self.root(), true, 0);
        if out.len() > 400 {
            let mut cut = 400;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push('…');
        }
        out
    }

    fn write_node(&self, out: &mut String, at: u32, expand: bool, depth: usize) {
        if depth > 8 || out.len() > 400 {
            out.push('…');
            return;
        }
        let Some(node) = self.nodes.get(at as usize) else {
            out.push('?');
            return;
        };
        let simple = match node {
            Node::Unit => "()",
            Node::Bool => "bool",
            Node::I8 => "i8",
            Node::I16 => "i16",
            Node::I32 => "i32",
            Node::I64 => "i64",
            Node::I128 => "i128",
            Node::U8 => "u8",
            Node::U16 => "u16",
            Node::U32 => "u32",
            Node::U64 => "u64",
            Node::U128 => "u128",
            Node::F32 => "f32",
            Node::F64 => "f64",
            Node::Char => "char",
            Node::Str => "String",
            Node::Bytes => "Bytes",
            _ => "",
        };
        out.push_str(simple);
        match node {
            Node::Option(c) => {
                out.push_str("Option<");
                self.write_node(out, *c, expand, depth + 1);
                out.push('>');
            }
            Node::Seq(c) => {
                out.push_str("Vec<");
                self.write_node(out, *c, expand, depth + 1);
                out.push('>');
            }
            Node::Map(k, v) => {
                out.push_str("Map<");
                self.write_node(out, *k, expand, depth + 1);
                out.push_str(", ");
                self.write_node(out, *v, expand, depth + 1);
                out.push('>');
            }
            Node::Tuple(items) => {
                out.push('(');
                for (i, c) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    self.write_node(out, *c, expand, depth + 1);
                }
                out.push(')');
            }
            Node::Array(c, n) => {
                out.push('[');
                self.write_node(out, *c, expand, depth + 1);
                let _ = write!(out, "; {n}]");
            }
            Node::Named(c) => {
                let Some(container) = self.containers.get(*c as usize) else {
                    out.push('?');
                    return;
                };
                out.push_str(&container.name);
                // Only the outermost container is spelled out.
                if expand && depth == 0 {
                    match &container.body {
                        ContainerBody::Struct(body) => self.write_body(out, body, depth),
                        ContainerBody::Enum(variants) => {
                            out.push_str(" { ");
                            for (i, (_, name, body)) in variants.iter().enumerate() {
                                if i > 0 {
                                    out.push_str(", ");
                                }
                                out.push_str(name);
                                self.write_body(out, body, depth);
                            }
                            out.push_str(" }");
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn write_body(&self, out: &mut String, body: &Body, depth: usize) {
        match body {
            Body::Unit => {}
            Body::NewType(n) => {
                out.push('(');
                self.write_node(out, *n, false, depth + 1);
                out.push(')');
            }
            Body::Tuple(items) => {
                out.push('(');
                for (i, n) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    self.write_node(out, *n, false, depth + 1);
                }
                out.push(')');
            }
            Body::Struct(fields) => {
                out.push_str(" { ");
                for (i, (name, n)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push_str(name);
                    out.push_str(": ");
                    self.write_node(out, *n, false, depth + 1);
                }
                out.push_str(" }");
            }
        }
    }
}

impl fmt::Display for TypeSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Structural comparison of two descriptions. Pairs of containers under comparison are
/// assumed equal when met again, which settles recursive types.
struct Comparison<'a> {
    a: &'a TypeSchema,
    b: &'a TypeSchema,
    assumed: HashSet<(u32, u32)>,
}

impl Comparison<'_> {
    fn nodes(&mut self, x: u32, y: u32, depth: usize) -> bool {
        if depth > 4 * MAX_DEPTH {
            return false;
        }
        let d = depth + 1;
        let (Some(nx), Some(ny)) = (self.a.nodes.get(x as usize), self.b.nodes.get(y as usize))
        else {
            return false;
        };
        match (nx, ny) {
            (Node::Option(p), Node::Option(q)) | (Node::Seq(p), Node::Seq(q)) => {
                self.nodes(*p, *q, d)
            }
            (Node::Array(p, n), Node::Array(q, m)) => n == m && self.nodes(*p, *q, d),
            (Node::Map(k1, v1), Node::Map(k2, v2)) => {
                self.nodes(*k1, *k2, d) && self.nodes(*v1, *v2, d)
            }
            (Node::Tuple(p), Node::Tuple(q)) => self.lists(p, q, d),
            (Node::Named(p), Node::Named(q)) => self.containers(*p, *q, d),
            (p, q) => std::mem::discriminant(p) == std::mem::discriminant(q) && is_leaf(p),
        }
    }

    fn lists(&mut self, p: &[u32], q: &[u32], depth: usize) -> bool {
        p.len() == q.len() && p.iter().zip(q).all(|(x, y)| self.nodes(*x, *y, depth))
    }

    fn containers(&mut self, p: u32, q: u32, depth: usize) -> bool {
        if !self.assumed.insert((p, q)) {
            return true;
        }
        let (Some(cp), Some(cq)) = (
            self.a.containers.get(p as usize),
            self.b.containers.get(q as usize),
        ) else {
            return false;
        };
        match (&cp.body, &cq.body) {
            (ContainerBody::Struct(x), ContainerBody::Struct(y)) => self.bodies(x, y, depth),
            (ContainerBody::Enum(x), ContainerBody::Enum(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .zip(y)
                        .all(|((i, n, b), (j, m, c))| i == j && n == m && self.bodies(b, c, depth))
            }
            _ => false,
        }
    }

    fn bodies(&mut self, x: &Body, y: &Body, depth: usize) -> bool {
        match (x, y) {
            (Body::Unit, Body::Unit) => true,
            (Body::NewType(p), Body::NewType(q)) => self.nodes(*p, *q, depth),
            (Body::Tuple(p), Body::Tuple(q)) => self.lists(p, q, depth),
            (Body::Struct(p), Body::Struct(q)) => {
                p.len() == q.len()
                    && p.iter()
                        .zip(q)
                        .all(|((n, a), (m, b))| n == m && self.nodes(*a, *b, depth))
            }
            _ => false,
        }
    }
}

fn is_leaf(node: &Node) -> bool {
    !matches!(
        node,
        Node::Option(_)
            | Node::Seq(_)
            | Node::Map(..)
            | Node::Tuple(_)
            | Node::Array(..)
            | Node::Named(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct A {
        amount: u32,
        note: String,
    }

    #[derive(Serialize, Deserialize)]
    struct Renamed {
        amount: u32,
        note: String,
    }

    #[derive(Serialize, Deserialize)]
    struct Swapped {
        note: String,
        amount: u32,
    }

    #[derive(Serialize, Deserialize)]
    struct SwappedSameType {
        x: u32,
        y: u32,
    }

    #[derive(Serialize, Deserialize)]
    struct SwappedSameType2 {
        y: u32,
        x: u32,
    }

    #[derive(Serialize, Deserialize)]
    enum Shape {
        Dot,
        Circle { r: f64 },
        Poly(Vec<(i32, i32)>),
    }

    #[derive(Serialize, Deserialize)]
    struct Drawing {
        shapes: Vec<Shape>,
        inner: Option<Inner>,
        last: Shape,
    }

    #[derive(Serialize, Deserialize)]
    enum Hidden {
        Plain,
        Deep(Inner),
    }

    #[derive(Serialize, Deserialize)]
    enum Inner {
        One(u8),
        Two(Option<Box<Inner>>),
    }

    #[test]
    fn structures_compare_by_shape_and_names_of_fields() {
        let a = TypeSchema::trace::<A>().unwrap();
        assert_eq!(a.name(), "A");
        assert_eq!(a.describe(), "A { amount: u32, note: String }");
        assert!(a.same_structure(&TypeSchema::trace::<Renamed>().unwrap()));
        assert!(!a.same_structure(&TypeSchema::trace::<Swapped>().unwrap()));
        let x = TypeSchema::trace::<SwappedSameType>().unwrap();
        assert!(!x.same_structure(&TypeSchema::trace::<SwappedSameType2>().unwrap()));
        let u = TypeSchema::trace::<u64>().unwrap();
        assert_eq!(u.name(), "u64");
        assert!(!u.same_structure(&TypeSchema::trace::<u32>().unwrap()));
        let v = TypeSchema::trace::<Vec<(String, Option<u8>)>>().unwrap();
        assert_eq!(v.name(), "Vec<(String, Option<u8>)>");
        assert!(v.same_structure(&v.clone()));
    }

    #[test]
    fn enums_nested_and_recursive_are_traced_completely() {
        let s = TypeSchema::trace::<Drawing>().unwrap();
        s.validate().unwrap();
        let hidden = TypeSchema::trace::<Hidden>().unwrap();
        assert_eq!(hidden.describe(), "Hidden { Plain, Deep(Inner) }");
        let inner = hidden
            .containers
            .iter()
            .find(|c| c.name == "Inner")
            .unwrap();
        assert!(matches!(&inner.body, ContainerBody::Enum(v) if v.len() == 2));
        let inner = s.containers.iter().find(|c| c.name == "Inner").unwrap();
        match &inner.body {
            ContainerBody::Enum(v) => assert_eq!(v.len(), 2),
            other => panic!("{other:?}"),
        }
        assert!(s.same_structure(&s.clone()));
        let shape = s.containers.iter().find(|c| c.name == "Shape").unwrap();
        match &shape.body {
            ContainerBody::Enum(v) => assert_eq!(v.len(), 3),
            other => panic!("{other:?}"),
        }
        assert!(
            s.describe()
                .starts_with("Drawing { shapes: Vec<Shape>, inner: Option<Inner>"),
            "{}",
            s.describe()
        );
        let shape = TypeSchema::trace::<Shape>().unwrap();
        assert_eq!(
            shape.describe(),
            "Shape { Dot, Circle { r: f64 }, Poly(Vec<(i32, i32)>) }"
        );
    }

    #[derive(Serialize, Deserialize)]
    enum List {
        Cons(u32, Box<List>),
        Nil,
    }

    #[derive(Serialize, Deserialize)]
    struct Tree {
        label: String,
        children: Vec<Tree>,
        parent: Option<Box<Tree>>,
    }

    #[derive(Serialize, Deserialize)]
    struct Odd {
        id: std::num::NonZeroU32,
        digest: [u8; 32],
        pair: (i8, i8),
        index: std::collections::HashMap<String, Vec<u16>>,
        #[serde(skip)]
        _cache: u64,
        unit: (),
        ch: char,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Untagged {
        A(u32),
        B(String),
    }

    #[derive(Serialize, Deserialize)]
    struct Wrapper<T> {
        inner: T,
    }

    #[derive(Serialize, Deserialize)]
    struct Pairs {
        a: Wrapper<u32>,
        b: Wrapper<String>,
    }

    /// A type whose `Deserialize` parses its text, like a timestamp type.
    struct Stamp;

    impl<'de> Deserialize<'de> for Stamp {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            let s = String::deserialize(d)?;
            if s.len() == 20 && s.ends_with('Z') && s.as_bytes()[10] == b'T' {
                Ok(Stamp)
            } else {
                Err(serde::de::Error::custom("not a timestamp"))
            }
        }
    }

    #[derive(Deserialize)]
    struct Event {
        _at: Stamp,
        _id: u32,
    }

    #[test]
    fn generic_types_and_parsing_types_are_traced() {
        let pairs = TypeSchema::trace::<Pairs>().unwrap();
        assert_eq!(
            pairs.describe(),
            "Pairs { a: Wrapper, b: Wrapper }",
            "two containers, each with its own parameter"
        );
        assert_eq!(pairs.containers.len(), 3);
        let event = TypeSchema::trace::<Event>().unwrap();
        assert_eq!(event.describe(), "Event { _at: String, _id: u32 }");
    }

    #[test]
    fn recursive_odd_and_untraceable_types() {
        let list = TypeSchema::trace::<List>().unwrap();
        assert_eq!(list.describe(), "List { Cons(u32, List), Nil }");
        assert!(list.same_structure(&list.clone()));
        let tree = TypeSchema::trace::<Tree>().unwrap();
        assert_eq!(
            tree.describe(),
            "Tree { label: String, children: Vec<Tree>, parent: Option<Tree> }"
        );
        assert!(!tree.same_structure(&list));
        let odd = TypeSchema::trace::<Odd>().unwrap();
        assert_eq!(
            odd.describe(),
            "Odd { id: u32, digest: [u8; 32], pair: (i8, i8), index: Map<String, Vec<u16>>, unit: (), ch: char }"
        );
        assert!(TypeSchema::trace::<Untagged>().is_none());
        // Recorded descriptions survive their own encoding.
        let bytes = crate::codec::encode_key(&tree).unwrap();
        let back: TypeSchema = crate::codec::decode_exact(&bytes, "schema").unwrap();
        back.validate().unwrap();
        assert!(back.same_structure(&tree));
    }

    #[test]
    fn hostile_descriptions_are_refused() {
        let forward = TypeSchema {
            nodes: vec![Node::Seq(1), Node::U8],
            containers: vec![],
        };
        assert!(forward.validate().is_err());
        let dangling = TypeSchema {
            nodes: vec![Node::Named(3)],
            containers: vec![],
        };
        assert!(dangling.validate().is_err());
        let mut deep = vec![Node::U8];
        for i in 0..200u32 {
            deep.push(Node::Option(i));
        }
        let deep = TypeSchema {
            nodes: deep,
            containers: vec![],
        };
        assert!(deep.validate().is_err());
        assert!(TypeSchema {
            nodes: vec![],
            containers: vec![]
        }
        .validate()
        .is_err());
    }
}
