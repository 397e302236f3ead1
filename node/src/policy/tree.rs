//! The parse tree as the classifier reads it.
//!
//! pg_query hands over its tree as prost structs: one Rust type per node kind, about 270 of them.
//! The classifier must see every field of every node (a call hidden in a field it skipped would
//! go unclassified), so it walks the tree generically, by field name, through the structs' own
//! `Serialize` implementations: serde visits every field. [`Tree`] is what that serialisation
//! builds: the shape `serde_json::to_value` gives (a struct is an object of its fields, `None` is
//! null, a oneof variant is an object with the variant's name as its only key), without a map
//! and a `String` per field: field names are the structs' own `&'static str`s and an object is
//! a short vector of them, in declaration order.

use serde::ser::{self, Serialize};
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Tree {
    Null,
    Bool(bool),
    Int(i64),
    /// Floating-point numbers and integers beyond `i64`: the classifier reads none.
    OtherNumber,
    Str(Box<str>),
    Array(Vec<Tree>),
    Object(Vec<(&'static str, Tree)>),
}

impl Tree {
    /// The tree of `value` (for pg_query's structs; a map, which none of them holds, is refused
    /// since its keys are not field names).
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Result<Tree, Error> {
        value.serialize(Builder)
    }

    /// The field `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Tree> {
        match self {
            Tree::Object(fields) => fields.iter().find(|(k, _)| *k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// What `path` (`/field/0/field`, as a JSON pointer without escapes) leads to.
    pub fn pointer(&self, path: &str) -> Option<&Tree> {
        let mut here = self;
        for step in path.strip_prefix('/')?.split('/') {
            here = match here {
                Tree::Array(items) => items.get(step.parse::<usize>().ok()?)?,
                _ => here.get(step)?,
            };
        }
        Some(here)
    }

    pub fn as_array(&self) -> Option<&[Tree]> {
        match self {
            Tree::Array(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Tree::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Tree::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Tree::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Tree::Null)
    }
}

/// Why a value has no tree.
#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl ser::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

struct Builder;

/// An array, a tuple, or the fields of a variant given as a tuple.
struct Items {
    variant: Option<&'static str>,
    items: Vec<Tree>,
}

/// The fields of a struct or of a variant given as a struct.
struct Fields {
    variant: Option<&'static str>,
    fields: Vec<(&'static str, Tree)>,
}

/// `{ "variant": inner }` for an enum's variant, `inner` for the rest.
fn tagged(variant: Option<&'static str>, inner: Tree) -> Tree {
    match variant {
        Some(name) => Tree::Object(vec![(name, inner)]),
        None => inner,
    }
}

impl ser::Serializer for Builder {
    type Ok = Tree;
    type Error = Error;
    type SerializeSeq = Items;
    type SerializeTuple = Items;
    type SerializeTupleStruct = Items;
    type SerializeTupleVariant = Items;
    type SerializeMap = ser::Impossible<Tree, Error>;
    type SerializeStruct = Fields;
    type SerializeStructVariant = Fields;

    fn serialize_bool(self, v: bool) -> Result<Tree, Error> {
        Ok(Tree::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Tree, Error> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_i16(self, v: i16) -> Result<Tree, Error> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_i32(self, v: i32) -> Result<Tree, Error> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_i64(self, v: i64) -> Result<Tree, Error> {
        Ok(Tree::Int(v))
    }
    fn serialize_u8(self, v: u8) -> Result<Tree, Error> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_u16(self, v: u16) -> Result<Tree, Error> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_u32(self, v: u32) -> Result<Tree, Error> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_u64(self, v: u64) -> Result<Tree, Error> {
        Ok(i64::try_from(v).map_or(Tree::OtherNumber, Tree::Int))
    }
    fn serialize_f32(self, _: f32) -> Result<Tree, Error> {
        Ok(Tree::OtherNumber)
    }
    fn serialize_f64(self, _: f64) -> Result<Tree, Error> {
        Ok(Tree::OtherNumber)
    }
    fn serialize_char(self, v: char) -> Result<Tree, Error> {
        Ok(Tree::Str(v.to_string().into()))
    }
    fn serialize_str(self, v: &str) -> Result<Tree, Error> {
        Ok(Tree::Str(v.into()))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Tree, Error> {
        Ok(Tree::Array(
            v.iter().map(|b| Tree::Int((*b).into())).collect(),
        ))
    }
    fn serialize_none(self) -> Result<Tree, Error> {
        Ok(Tree::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Tree, Error> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Tree, Error> {
        Ok(Tree::Null)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<Tree, Error> {
        Ok(Tree::Null)
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<Tree, Error> {
        Ok(Tree::Str(variant.into()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<Tree, Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Tree, Error> {
        Ok(tagged(Some(variant), value.serialize(self)?))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Items, Error> {
        Ok(Items {
            variant: None,
            items: Vec::with_capacity(len.unwrap_or(0)),
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<Items, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<Items, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Items, Error> {
        Ok(Items {
            variant: Some(variant),
            items: Vec::with_capacity(len),
        })
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Error> {
        Err(Error("a map in the parse tree".into()))
    }
    fn serialize_struct(self, _: &'static str, len: usize) -> Result<Fields, Error> {
        Ok(Fields {
            variant: None,
            fields: Vec::with_capacity(len),
        })
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Fields, Error> {
        Ok(Fields {
            variant: Some(variant),
            fields: Vec::with_capacity(len),
        })
    }
}

impl Items {
    fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.items.push(value.serialize(Builder)?);
        Ok(())
    }

    fn finish(self) -> Result<Tree, Error> {
        Ok(tagged(self.variant, Tree::Array(self.items)))
    }
}

/// The serde traits an [`Items`] stands for: each hands over its elements one by one.
macro_rules! items {
    ($($serialize:ident :: $element:ident),*) => {$(
        impl ser::$serialize for Items {
            type Ok = Tree;
            type Error = Error;
            fn $element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
                self.push(value)
            }
            fn end(self) -> Result<Tree, Error> {
                self.finish()
            }
        }
    )*};
}

items!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl Fields {
    fn push<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Error> {
        self.fields.push((key, value.serialize(Builder)?));
        Ok(())
    }

    fn finish(self) -> Result<Tree, Error> {
        Ok(tagged(self.variant, Tree::Object(self.fields)))
    }
}

/// The serde traits a [`Fields`] stands for: each hands over its fields by name.
macro_rules! fields {
    ($($serialize:ident),*) => {$(
        impl ser::$serialize for Fields {
            type Ok = Tree;
            type Error = Error;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), Error> {
                self.push(key, value)
            }
            fn end(self) -> Result<Tree, Error> {
                self.finish()
            }
        }
    )*};
}

fields!(SerializeStruct, SerializeStructVariant);

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree has the shape and the values `serde_json::to_value` gives, for the statements
    /// the classifier's tests use and for every kind of value pg_query's structs hold.
    #[test]
    fn the_tree_is_what_serde_json_gives() {
        fn same(tree: &Tree, json: &serde_json::Value) -> bool {
            use serde_json::Value as J;
            match (tree, json) {
                (Tree::Null, J::Null) => true,
                (Tree::Bool(a), J::Bool(b)) => a == b,
                (Tree::Int(a), J::Number(b)) => b.as_i64() == Some(*a),
                (Tree::OtherNumber, J::Number(b)) => b.as_i64().is_none(),
                (Tree::Str(a), J::String(b)) => **a == **b,
                (Tree::Array(a), J::Array(b)) => {
                    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y))
                }
                (Tree::Object(a), J::Object(b)) => {
                    a.len() == b.len()
                        && a.iter().all(|(k, v)| b.get(*k).is_some_and(|w| same(v, w)))
                }
                _ => false,
            }
        }
        for sql in [
            "SELECT 1.5, -2, 'x', true, NULL, $1 FROM t WHERE a = ANY('{1,2}'::int[])",
            "WITH m AS (DELETE FROM q RETURNING *) INSERT INTO d SELECT * FROM m",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "COPY t FROM PROGRAM 'id'; SET client_encoding = 'LATIN1'; EXPLAIN ANALYZE DELETE FROM t",
            "SELECT x'ff', b'01', 1e300, 9223372036854775807, 99999999999999999999",
        ] {
            let parsed = pg_query::parse(sql, 0).unwrap();
            let tree = Tree::of(&parsed.protobuf).unwrap();
            let json = serde_json::to_value(&parsed.protobuf).unwrap();
            assert!(same(&tree, &json), "{sql}");
        }
    }

    #[test]
    fn pointers_and_fields() {
        let parsed = pg_query::parse("SELECT a FROM s.t", 0).unwrap();
        let tree = Tree::of(&parsed.protobuf).unwrap();
        let select = tree.pointer("/stmts/0/stmt/node/SelectStmt").unwrap();
        let from = select.pointer("/from_clause/0/node/RangeVar").unwrap();
        assert_eq!(from.get("relname").and_then(Tree::as_str), Some("t"));
        assert_eq!(from.get("schemaname").and_then(Tree::as_str), Some("s"));
        assert!(select.get("where_clause").is_some_and(Tree::is_null));
        assert!(select.get("no_such_field").is_none());
        assert!(tree.pointer("/stmts/1").is_none());
        assert!(tree.pointer("stmts").is_none());
    }
}
