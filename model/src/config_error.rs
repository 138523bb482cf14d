//! One error for every config file strangler reads (router, collector, CDC), with
//! the place in the file when TOML gave one, and one line/column helper.

use std::path::{Path, PathBuf};

/// A value that does not make sense, said in words that name the field.
///
/// Returned by the small validators (route names, percentages, addresses) that
/// do not know which file they are reading; [`ConfigError::invalid`] adds the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    /// The same complaint, prefixed with where it applies (`route orders: …`).
    pub fn context(self, prefix: impl std::fmt::Display) -> Self {
        Self(format!("{prefix}: {}", self.0))
    }
}

impl From<String> for Invalid {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for Invalid {
    fn from(message: &str) -> Self {
        Self(message.to_string())
    }
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, or a field of the wrong type or name.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// The values parse but do not make a working service.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the section or entry.
        message: String,
    },
    /// A part of the file was refused by its own parser (a CDC mapping's SQL, say),
    /// which keeps its own error with its own position.
    #[error("{path}: {source}")]
    Part {
        /// The file.
        path: PathBuf,
        /// The part's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ConfigError {
    /// Reads a config file.
    pub fn read(path: &Path) -> Result<String, Self> {
        std::fs::read_to_string(path).map_err(|source| Self::Read {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Deserializes TOML text, turning a syntax or schema error into `FILE:LINE:COLUMN`.
    pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T, Self> {
        toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_col(text, span.start))
                .unwrap_or((1, 1));
            Self::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })
    }

    /// A validation failure in `path`.
    pub fn invalid(path: &Path, invalid: Invalid) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            message: invalid.0,
        }
    }
}

/// The 1-based line and column of a byte offset in `text` (columns count characters).
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Small {
        name: String,
    }

    #[test]
    fn line_and_column_count_characters_from_one() {
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("a\nbc", 3), (2, 2));
        assert_eq!(line_col("é\nxé", 6), (2, 3));
        assert_eq!(
            line_col("é\nxé", 5),
            (2, 2),
            "inside a character: its start"
        );
        assert_eq!(line_col("ab", 99), (1, 3));
    }

    #[test]
    fn a_toml_error_names_file_line_and_column() {
        let err = ConfigError::parse_toml::<Small>("name = \"x\"\nnmae = 1\n", Path::new("c.toml"))
            .expect_err("unknown key");
        let text = err.to_string();
        assert!(text.starts_with("c.toml:2:1: "), "{text}");
        assert!(text.contains("nmae"), "{text}");
    }
}
