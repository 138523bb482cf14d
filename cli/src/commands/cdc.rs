//! `strangler cdc …`: run, check, verify, status, resnapshot, schema.

use std::process::ExitCode;

use anyhow::Context as _;

use crate::*;

pub fn run(command: CdcCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match command {
        CdcCommand::Run { config, resnapshot } => {
            let config = strangler_cdc::CdcConfig::load(&config)?;
            init_logging(false, SERVICE_LOG);
            runtime.block_on(async {
                let stop = strangler_cdc::CancellationToken::new();
                let on_signal = stop.clone();
                tokio::spawn(async move {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .ok();
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {}
                    }
                    tracing::info!("stopping after the current transaction");
                    on_signal.cancel();
                });
                strangler_cdc::pipeline::run(
                    &config,
                    strangler_cdc::pipeline::RunOptions {
                        resnapshot,
                        stop: Some(stop),
                        observe: None,
                    },
                )
                .await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        CdcCommand::Check { config } => {
            let config = strangler_cdc::CdcConfig::load(&config)?;
            let plans = runtime.block_on(strangler_cdc::check(&config))?;
            for p in &plans {
                println!(
                    "ok  {}.{} -> {}  ({} columns, key {})",
                    p.source.schema,
                    p.source.name,
                    p.target.quoted(),
                    p.mapping.outputs.len(),
                    p.target.key.join(", ")
                );
                match p.mapping.reverse(&p.source.key) {
                    strangler_cdc::mapping::Reverse::Derived(sql) => {
                        println!("    reverse (derived): {sql}")
                    }
                    strangler_cdc::mapping::Reverse::Explicit(why) => {
                        println!("    reverse: write it explicitly ({why})")
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CdcCommand::Verify {
            config,
            output,
            wait_secs,
        } => {
            let config = strangler_cdc::CdcConfig::load(&config)?;
            let reports = runtime.block_on(strangler_cdc::ops::verify::verify(
                &config,
                std::time::Duration::from_secs(wait_secs),
            ))?;
            let clean = reports.iter().all(|r| r.clean());
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "clean": clean, "tables": reports })
                    )?
                ),
                Output::Table => {
                    for r in &reports {
                        let verdict = if r.clean() { "clean" } else { "DIFFERENT" };
                        println!(
                            "{verdict:<9} {}  source {} rows, target {} rows, {} ranges, {:.2} s",
                            r.table, r.source_rows, r.target_rows, r.ranges_compared, r.seconds
                        );
                        let show = |what: &str, keys: &[String]| {
                            if !keys.is_empty() {
                                let head: Vec<&str> =
                                    keys.iter().take(20).map(String::as_str).collect();
                                println!(
                                    "  {what} ({}): {}{}",
                                    keys.len(),
                                    head.join(", "),
                                    if keys.len() > 20 { ", …" } else { "" }
                                );
                            }
                        };
                        show("missing in target", &r.missing);
                        show("only in target", &r.extra);
                        show("different", &r.different);
                    }
                }
            }
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        CdcCommand::Resnapshot {
            config,
            table,
            wait_secs,
        } => {
            let config = strangler_cdc::CdcConfig::load(&config)?;
            let rows = runtime.block_on(strangler_cdc::ops::resnapshot::request(
                &config,
                &table,
                std::time::Duration::from_secs(wait_secs),
            ))?;
            println!("re-copied {table}: {rows} rows; streaming continues");
            Ok(ExitCode::SUCCESS)
        }
        CdcCommand::Schema {
            from,
            to,
            tables,
            apply,
        } => {
            if to != "postgres" {
                anyhow::bail!("--to {to:?}: only postgres is supported");
            }
            let t = runtime.block_on(strangler_cdc::mysql::schema::from_mysql(&from, &tables))?;
            print!("{}", t.script());
            if let Some(url) = apply {
                runtime.block_on(async {
                    let (client, connection) =
                        tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                    tokio::spawn(connection);
                    client
                        .batch_execute(&format!("BEGIN;\n{}COMMIT;", t.script()))
                        .await
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "applying to {url}: {}",
                                e.as_db_error()
                                    .map_or_else(|| e.to_string(), |d| d.message().to_string())
                            )
                        })
                })?;
                eprintln!("applied {} statements", t.statements.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        CdcCommand::Status { config, output } => {
            let config = strangler_cdc::CdcConfig::load(&config)?;
            let s = runtime.block_on(strangler_cdc::ops::status(&config))?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
                Output::Table => {
                    let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                    println!(
                        "slot          {} ({})",
                        s.slot,
                        if !s.slot_exists {
                            "missing"
                        } else if s.slot_active {
                            "active"
                        } else {
                            "inactive"
                        }
                    );
                    println!("source        {}", s.source_lsn);
                    println!("confirmed     {}", or(&s.confirmed_lsn));
                    println!("applied       {}", or(&s.applied_lsn));
                    println!(
                        "lag           {}",
                        s.lag_bytes.map_or("-".into(), |b| format!("{b} bytes"))
                    );
                    println!(
                        "retained WAL  {}",
                        s.retained_bytes
                            .map_or("-".into(), |b| format!("{b} bytes"))
                    );
                    println!(
                        "checkpoint    {}",
                        s.checkpoint_age_seconds
                            .map_or("-".into(), |a| format!("{a:.1} s ago"))
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
