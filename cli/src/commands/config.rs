//! `strangler config check`.

use std::path::Path;
use std::process::ExitCode;

use strangler_router::RouterConfig;
use strangler_router::config::Secrets;

/// Validates a config as its service would at start-up (a router's credentials
/// included).
pub fn check(file: &Path, kind: crate::ConfigKind) -> anyhow::Result<ExitCode> {
    match kind {
        crate::ConfigKind::Router => {}
        crate::ConfigKind::Collector => {
            let c = strangler_collector::CollectorConfig::load(Some(file))?;
            println!(
                "{}: ok (collector: OTLP gRPC {}, HTTP {}, ClickHouse {})",
                file.display(),
                c.grpc_listen,
                c.http_listen,
                c.clickhouse_url
            );
            return Ok(ExitCode::SUCCESS);
        }
        crate::ConfigKind::Cdc => {
            let c = strangler_cdc::CdcConfig::load(file)?;
            println!(
                "{}: ok (cdc: {} mapping{}, slot {})",
                file.display(),
                c.mappings.len(),
                if c.mappings.len() == 1 { "" } else { "s" },
                c.slot
            );
            return Ok(ExitCode::SUCCESS);
        }
    }
    let config = RouterConfig::load(file)?;
    Secrets::read(&config)?;
    println!(
        "{}: ok ({} route{}, legacy {}, listening on {})",
        file.display(),
        config.routes.len(),
        if config.routes.len() == 1 { "" } else { "s" },
        config.legacy.authority,
        config.listen
    );
    Ok(ExitCode::SUCCESS)
}
