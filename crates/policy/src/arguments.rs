//! Projection of MCP tool arguments onto the record the schema declares for each tool.
//!
//! Tool arguments are arbitrary JSON chosen by the (untrusted) agent, while Cedar validates a
//! context against declared types. The schema's common type `ToolArguments` therefore has one
//! optional attribute per tool, named after the tool, whose record type lists the arguments
//! policies may read. For a `tools/call` of tool `t` with arguments `a`, policies see
//! `context.tool.arguments == { t: project(declared[t], a) }`:
//!
//! - attributes the declared record does not name are dropped (invisible to policies), at
//!   every nesting level of declared records;
//! - declared attributes are passed on as sent, so Cedar's schema-directed context parsing
//!   rejects a wrong type or a missing required attribute, and the request denies (every
//!   evaluation error denies);
//! - a tool the schema does not declare gets `{}`, as does every tool while a `tools/list`
//!   result is filtered (the proxy then sends no `arguments` at all).
//!
//! The server's tool annotations (`context.tool.annotations`, which the proxy remembers from
//! the `tools/list` results it filtered) are projected the same way onto the record the
//! schema's `ToolCall.annotations` declares, and removed when the schema declares none, so
//! a schema written before annotations existed keeps validating.
//!
//! This module does not decide anything and does not read the arguments' meaning.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The common type holding the per-tool argument records.
pub(crate) const TOOL_ARGUMENTS_TYPE: &str = "ToolArguments";

/// The common type of `context.tool`, whose optional `annotations` attribute declares the
/// tool annotations policies may read.
pub(crate) const TOOL_CALL_TYPE: &str = "ToolCall";

/// Declared shape of a value: a record whose attributes are known, or anything else (which
/// Cedar checks itself).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Shape {
    Record(BTreeMap<String, Shape>),
    #[default]
    Leaf,
}

/// Per-tool argument shapes from the schema.
#[derive(Debug, Clone, Default)]
pub(crate) struct ToolArgumentShapes {
    tools: BTreeMap<String, Shape>,
    /// The shape of `ToolCall.annotations`; `None` when the schema declares no annotations.
    annotations: Option<Shape>,
}

/// Nested common-type references deeper than this are treated as leaves (Cedar checks them);
/// it only bounds the walk over a schema with reference cycles.
const MAX_DEPTH: usize = 16;

impl ToolArgumentShapes {
    /// Reads `ToolArguments` from the schema source (Cedar syntax). A schema without it
    /// declares no tool arguments.
    pub(crate) fn from_cedarschema(src: &str) -> Result<Self, String> {
        let (fragment, _warnings) =
            cedar_policy::SchemaFragment::from_cedarschema_str(src).map_err(|e| e.to_string())?;
        let json = fragment.to_json_value().map_err(|e| e.to_string())?;
        let common = &json[""]["commonTypes"];
        let tools = match shape(common, &common[TOOL_ARGUMENTS_TYPE], 0) {
            Shape::Record(tools) => tools,
            Shape::Leaf => BTreeMap::new(),
        };
        let annotations = match shape(common, &common[TOOL_CALL_TYPE], 0) {
            Shape::Record(mut attrs) => attrs.remove("annotations"),
            Shape::Leaf => None,
        };
        Ok(Self { tools, annotations })
    }

    /// Replaces `tool.arguments` (the raw JSON the caller sent, or absent) with its
    /// projection for `tool.name`.
    pub(crate) fn project_into(&self, tool: &mut Value) {
        let name = tool["name"].as_str().unwrap_or_default().to_owned();
        let raw = tool.get("arguments").cloned();
        let mut projected = Map::new();
        if let (Some(raw), Some(shape)) = (raw, self.tools.get(&name)) {
            projected.insert(name, project(shape, &raw));
        }
        tool["arguments"] = Value::Object(projected);
        // Removed, and put back projected only when the schema declares annotations.
        if let Some(object) = tool.as_object_mut()
            && let Some(given) = object.remove("annotations")
            && let Some(shape) = &self.annotations
        {
            object.insert("annotations".to_owned(), project(shape, &given));
        }
    }
}

fn shape(common: &Value, ty: &Value, depth: usize) -> Shape {
    if depth > MAX_DEPTH {
        return Shape::Leaf;
    }
    match ty["type"].as_str() {
        Some("Record") => Shape::Record(
            ty["attributes"]
                .as_object()
                .map(|attrs| {
                    attrs
                        .iter()
                        .map(|(name, attr)| (name.clone(), shape(common, attr, depth + 1)))
                        .collect()
                })
                .unwrap_or_default(),
        ),
        // A reference to another common type (`type Amount = {...}; refund?: Amount`).
        Some("EntityOrCommon" | "CommonType") => match ty["name"].as_str() {
            Some(name) if common.get(name).is_some() => shape(common, &common[name], depth + 1),
            _ => Shape::Leaf,
        },
        Some(name) if common.get(name).is_some() => shape(common, &common[name], depth + 1),
        _ => Shape::Leaf,
    }
}

fn project(shape: &Shape, value: &Value) -> Value {
    match (shape, value) {
        (Shape::Record(attrs), Value::Object(map)) => Value::Object(
            attrs
                .iter()
                .filter_map(|(name, shape)| {
                    map.get(name).map(|v| (name.clone(), project(shape, v)))
                })
                .collect(),
        ),
        // Not a record where one is declared, or a leaf: Cedar's typed parsing decides.
        _ => value.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const SCHEMA: &str = r#"
        type Money = { amount: Long, currency?: String };
        type ToolArguments = {
          refund?: { amount: Long, note?: String, meta?: { level: Long } },
          "get-weather"?: { city?: String },
          pay?: Money,
        };
    "#;

    #[test]
    fn projects_onto_declared_records() {
        let shapes = ToolArgumentShapes::from_cedarschema(SCHEMA).unwrap();
        let mut tool = json!({
            "name": "refund",
            "arguments": {"amount": 5, "secret": "x", "meta": {"level": 1, "extra": true}},
        });
        shapes.project_into(&mut tool);
        assert_eq!(
            tool["arguments"],
            json!({"refund": {"amount": 5, "meta": {"level": 1}}})
        );

        let mut tool = json!({"name": "pay", "arguments": {"amount": 1, "to": "y"}});
        shapes.project_into(&mut tool);
        assert_eq!(tool["arguments"], json!({"pay": {"amount": 1}}));

        let mut tool = json!({"name": "get-weather", "arguments": {"city": "Oslo"}});
        shapes.project_into(&mut tool);
        assert_eq!(tool["arguments"], json!({"get-weather": {"city": "Oslo"}}));
    }

    #[test]
    fn undeclared_tools_and_listing_see_nothing() {
        let shapes = ToolArgumentShapes::from_cedarschema(SCHEMA).unwrap();
        let mut tool = json!({"name": "other", "arguments": {"amount": 5}});
        shapes.project_into(&mut tool);
        assert_eq!(tool["arguments"], json!({}));
        let mut tool = json!({"name": "refund"});
        shapes.project_into(&mut tool);
        assert_eq!(tool["arguments"], json!({}));
    }

    #[test]
    fn annotations_are_projected_or_dropped_by_the_schema() {
        let declared = format!(
            "{SCHEMA}
            type Hints = {{ readOnlyHint?: Bool, destructiveHint?: Bool }};
            type ToolCall = {{ name: String, arguments: ToolArguments, annotations?: Hints }};"
        );
        let shapes = ToolArgumentShapes::from_cedarschema(&declared).unwrap();
        let mut tool = json!({
            "name": "refund",
            "annotations": {"destructiveHint": true, "openWorldHint": false},
        });
        shapes.project_into(&mut tool);
        assert_eq!(tool["annotations"], json!({"destructiveHint": true}));
        let mut tool = json!({"name": "refund"});
        shapes.project_into(&mut tool);
        assert_eq!(tool.get("annotations"), None);

        // A schema from before annotations: the key goes, so the context still validates.
        let shapes = ToolArgumentShapes::from_cedarschema(SCHEMA).unwrap();
        let mut tool = json!({"name": "refund", "annotations": {"readOnlyHint": true}});
        shapes.project_into(&mut tool);
        assert_eq!(tool.get("annotations"), None);
        assert_eq!(tool["arguments"], json!({}));
    }

    #[test]
    fn wrong_types_pass_through_for_cedar_to_reject() {
        let shapes = ToolArgumentShapes::from_cedarschema(SCHEMA).unwrap();
        let mut tool = json!({"name": "refund", "arguments": {"amount": "50"}});
        shapes.project_into(&mut tool);
        assert_eq!(tool["arguments"], json!({"refund": {"amount": "50"}}));
    }
}
