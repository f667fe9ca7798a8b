//! Labels: `key=value` pairs a store's agent declares about itself (`region=north`,
//! `brand=burger-co`), sent with `hello` so that the fleet can be targeted by them.
//!
//! They are validated where they enter (the agent's configuration, and the server at `hello`),
//! so a label that reaches a log line, a filter or a database is plain, short ASCII.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// At most this many labels per agent.
pub const MAX_LABELS: usize = 32;
/// Longest key, in bytes.
pub const MAX_LABEL_KEY_LEN: usize = 63;
/// Longest value, in bytes.
pub const MAX_LABEL_VALUE_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("{0:?} is not key=value")]
    NotAPair(String),
    #[error(
        "label key {0:?} must be 1 to {MAX_LABEL_KEY_LEN} characters of a-z, 0-9, '-', '_' or '.', starting with a letter"
    )]
    InvalidKey(String),
    #[error(
        "label value {0:?} must be 0 to {MAX_LABEL_VALUE_LEN} characters of a-z, A-Z, 0-9, '-', '_', '.' or '/'"
    )]
    InvalidValue(String),
    #[error("label {0:?} is given twice")]
    Duplicate(String),
    #[error("at most {MAX_LABELS} labels")]
    TooMany,
}

/// One label, as given on the command line (`key=value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub key: String,
    pub value: String,
}

impl Label {
    pub fn new(key: &str, value: &str) -> Result<Self, LabelError> {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY_LEN
            && key.starts_with(|c: char| c.is_ascii_lowercase())
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
        if !key_ok {
            return Err(LabelError::InvalidKey(key.to_owned()));
        }
        let value_ok = value.len() <= MAX_LABEL_VALUE_LEN
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !value_ok {
            return Err(LabelError::InvalidValue(value.to_owned()));
        }
        Ok(Self {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }
}

impl std::str::FromStr for Label {
    type Err = LabelError;
    fn from_str(s: &str) -> Result<Self, LabelError> {
        let (key, value) = s
            .split_once('=')
            .ok_or_else(|| LabelError::NotAPair(s.to_owned()))?;
        Label::new(key.trim(), value.trim())
    }
}

/// An agent's labels, sorted by key, each key once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    pub fn from_list(list: impl IntoIterator<Item = Label>) -> Result<Self, LabelError> {
        let mut map = BTreeMap::new();
        for label in list {
            if map.insert(label.key.clone(), label.value).is_some() {
                return Err(LabelError::Duplicate(label.key));
            }
        }
        if map.len() > MAX_LABELS {
            return Err(LabelError::TooMany);
        }
        Ok(Self(map))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether every one of `wanted` is among these labels.
    pub fn matches_all(&self, wanted: &[Label]) -> bool {
        wanted
            .iter()
            .all(|l| self.get(&l.key) == Some(l.value.as_str()))
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (k, v) in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        let list = raw
            .iter()
            .map(|(k, v)| Label::new(k, v))
            .collect::<Result<Vec<_>, _>>()
            .map_err(serde::de::Error::custom)?;
        Labels::from_list(list).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked_where_they_enter() {
        let ok: Label = "region=north".parse().unwrap();
        assert_eq!((ok.key.as_str(), ok.value.as_str()), ("region", "north"));
        assert!(
            "brand=".parse::<Label>().is_ok(),
            "an empty value is a value"
        );
        for bad in [
            "region",
            "=north",
            "Region=north",
            "1st=a",
            "region=no rth",
            "region=a\nb",
            "region=\u{1b}[2J",
            "re gion=a",
        ] {
            assert!(bad.parse::<Label>().is_err(), "{bad:?}");
        }
        let long = format!("k={}", "v".repeat(MAX_LABEL_VALUE_LEN + 1));
        assert!(long.parse::<Label>().is_err());
        let twice = ["a=1", "a=2"].map(|s| s.parse::<Label>().unwrap());
        assert_eq!(
            Labels::from_list(twice),
            Err(LabelError::Duplicate("a".into()))
        );
        let many = (0..=MAX_LABELS).map(|i| Label::new(&format!("k{i}"), "v").unwrap());
        assert_eq!(Labels::from_list(many), Err(LabelError::TooMany));
    }

    #[test]
    fn labels_travel_as_a_json_object_and_are_checked_on_the_way_in() {
        let labels =
            Labels::from_list(["region=north", "brand=burger-co"].map(|s| s.parse().unwrap()))
                .unwrap();
        let json = serde_json::to_string(&labels).unwrap();
        assert_eq!(json, r#"{"brand":"burger-co","region":"north"}"#);
        assert_eq!(serde_json::from_str::<Labels>(&json).unwrap(), labels);
        assert!(serde_json::from_str::<Labels>(r#"{"Bad Key":"x"}"#).is_err());
        assert!(labels.matches_all(&["region=north".parse().unwrap()]));
        assert!(!labels.matches_all(&["region=south".parse().unwrap()]));
        assert_eq!(labels.to_string(), "brand=burger-co,region=north");
    }
}
