//! Routes and the two sides of a migration: a route's name, the side that serves a
//! request, and why.

use std::fmt;

use crate::config_error::Invalid;

/// A route's name: lowercase letters, digits, `-` and `_`; it names the flag, the
/// metrics and the history entries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteName(String);

impl RouteName {
    /// Longest accepted name: it ends up in flag names, metric labels and paths.
    pub const MAX_LEN: usize = 64;

    /// Checks and wraps a route name.
    pub fn new(name: &str) -> Result<Self, Invalid> {
        let ok = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if ok {
            Ok(Self(name.to_string()))
        } else {
            Err(Invalid(format!(
                "route name {name:?} must be 1-64 characters of a-z, 0-9, '-' or '_'"
            )))
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The route's Unleash toggle unless the route names another: `strangler.<route>`.
    pub fn default_flag(&self) -> String {
        format!("{}{}", crate::names::FLAG_PREFIX, self.0)
    }
}

impl fmt::Display for RouteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for RouteName {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        Self::new(s)
    }
}

/// Which side serves a request (`strangler.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The monolith.
    Legacy,
    /// The new service.
    New,
}

impl Backend {
    /// Both, legacy first: the order of every table that shows the two.
    pub const ALL: [Backend; 2] = [Backend::Legacy, Backend::New];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Legacy => "legacy",
            Self::New => "new",
        }
    }

    /// The other side: where a shadow copy of a request served here goes.
    pub fn other(self) -> Self {
        match self {
            Self::Legacy => Self::New,
            Self::New => Self::Legacy,
        }
    }

    /// Parses the wire name.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "legacy" => Some(Self::Legacy),
            "new" => Some(Self::New),
            _ => None,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a side was chosen (`strangler.decision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// An admin override.
    Override,
    /// The route's flag.
    Flag,
    /// No route matched or the flag is unknown: legacy.
    Default,
    /// The new service failed (or its breaker is open) and legacy served instead.
    Fallback,
}

impl Reason {
    /// Every reason, in the order metrics list them.
    pub const ALL: [Reason; 4] = [
        Reason::Override,
        Reason::Flag,
        Reason::Default,
        Reason::Fallback,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Override => "override",
            Self::Flag => "flag",
            Self::Default => "default",
            Self::Fallback => "fallback",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_names_are_short_lowercase_words() {
        assert!(RouteName::new("orders-v2_x").is_ok());
        assert!(RouteName::new("").is_err());
        assert!(RouteName::new("Orders").is_err());
        assert!(RouteName::new("a b").is_err());
        assert!(RouteName::new(&"a".repeat(65)).is_err());
        assert_eq!(
            RouteName::new("orders").map(|n| n.default_flag()),
            Ok("strangler.orders".to_string())
        );
    }

    #[test]
    fn wire_names_round_trip() {
        for b in Backend::ALL {
            assert_eq!(Backend::parse(b.as_str()), Some(b));
            assert_eq!(
                serde_json::to_string(&b).ok(),
                Some(format!("\"{}\"", b.as_str()))
            );
        }
        for r in Reason::ALL {
            assert_eq!(
                serde_json::to_string(&r).ok(),
                Some(format!("\"{}\"", r.as_str()))
            );
        }
        assert_eq!(Backend::Legacy.other(), Backend::New);
    }
}
