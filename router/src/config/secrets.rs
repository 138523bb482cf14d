//! Credentials, read once when the router starts (and by `strangler config check`
//! and the CLI): never while parsing, never on reload, never logged.

use std::net::SocketAddr;
use std::path::Path;

use super::{
    ConfigError, DEFAULT_ADMIN_TOKEN_ENV, FlagsConfig, RouterConfig, Secret, SecretSource,
};

/// The credentials a config refers to.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// The admin API's bearer token; `None` only on a loopback admin address.
    pub admin_token: Option<Secret>,
    /// The Unleash client token, when flags come from Unleash and its env var is set.
    pub unleash_token: Option<Secret>,
}

impl Secrets {
    /// Reads every credential `config` names. Fails on an unreadable or empty token
    /// file, and on an admin API off loopback without a token.
    pub fn read(config: &RouterConfig) -> Result<Self, ConfigError> {
        let path = &config.source;
        let admin_token = read_source(&config.admin.token, path)?;
        check_admin_exposure(config.admin.listen, admin_token.is_some(), path)?;
        let unleash_token = match &config.flags {
            FlagsConfig::Unleash { token_env, .. } => from_env(token_env),
            FlagsConfig::File { .. } => None,
        };
        Ok(Self {
            admin_token,
            unleash_token,
        })
    }
}

fn from_env(name: &str) -> Option<Secret> {
    std::env::var(name)
        .ok()
        .filter(|t| !t.trim().is_empty())
        .map(Secret::new)
}

fn read_source(source: &SecretSource, config: &Path) -> Result<Option<Secret>, ConfigError> {
    match source {
        SecretSource::Env(name) => Ok(from_env(name)),
        SecretSource::File(file) => {
            let invalid = |message: String| ConfigError::Invalid {
                path: config.to_path_buf(),
                message,
            };
            let token = std::fs::read_to_string(file)
                .map_err(|e| invalid(format!("admin.token_file {}: {e}", file.display())))?;
            let token = token.trim();
            if token.is_empty() {
                return Err(invalid(format!(
                    "admin.token_file {} is empty",
                    file.display()
                )));
            }
            Ok(Some(Secret::new(token)))
        }
    }
}

/// An admin API that can flip production traffic is not served off loopback
/// without a token.
fn check_admin_exposure(
    listen: SocketAddr,
    has_token: bool,
    config: &Path,
) -> Result<(), ConfigError> {
    if has_token || listen.ip().is_loopback() {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        path: config.to_path_buf(),
        message: format!(
            "admin.listen = {listen} is not a loopback address and no admin token is set \
             (set {DEFAULT_ADMIN_TOKEN_ENV} or admin.token_file); refusing to expose an unauthenticated admin API"
        ),
    })
}
