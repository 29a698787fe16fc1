//! Tool arguments: a JSON object with a fixed set of fields, each checked by name.

use serde_json::{Map, Value};

use actors::tools::{codes, ToolFailure};

pub(crate) struct Args {
    tool: &'static str,
    fields: Map<String, Value>,
}

impl Args {
    /// `args` must be an object (or null, read as `{}`) with no fields other than `allowed`.
    pub(crate) fn new(
        tool: &'static str,
        args: Value,
        allowed: &[&str],
    ) -> Result<Args, ToolFailure> {
        let fields = match args {
            Value::Object(fields) => fields,
            Value::Null => Map::new(),
            _ => {
                return Err(ToolFailure::new(
                    codes::INVALID_ARGS,
                    format!("{tool}: arguments must be a JSON object"),
                ))
            }
        };
        if let Some(unknown) = fields.keys().find(|key| !allowed.contains(&key.as_str())) {
            return Err(ToolFailure::new(
                codes::INVALID_ARGS,
                format!(
                    "{tool}: unknown argument `{unknown}` (expected: {})",
                    allowed.join(", ")
                ),
            ));
        }
        Ok(Args { tool, fields })
    }

    pub(crate) fn optional_str(&mut self, field: &str) -> Result<Option<String>, ToolFailure> {
        match self.fields.remove(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.invalid(field, "must be a string")),
        }
    }

    pub(crate) fn required_str(&mut self, field: &str) -> Result<String, ToolFailure> {
        self.optional_str(field)?
            .ok_or_else(|| self.invalid(field, "is required (a string)"))
    }

    pub(crate) fn optional_bool(&mut self, field: &str) -> Result<Option<bool>, ToolFailure> {
        match self.fields.remove(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(self.invalid(field, "must be a boolean")),
        }
    }

    pub(crate) fn invalid(&self, field: &str, problem: &str) -> ToolFailure {
        ToolFailure::new(
            codes::INVALID_ARGS,
            format!("{}: argument `{field}` {problem}", self.tool),
        )
    }
}
