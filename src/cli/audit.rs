//! `gatehouse audit tail|search|export|verify` and `gatehouse bans list|lift`.

use std::io::Write as _;
use std::time::Duration;

use super::{AuditCommand, BansCommand, Session, print_json};
use crate::audit::{EventView, MAX_PAGE};
use crate::config::Config;
use crate::manage::{Command, Outcome};

/// How often `audit tail --follow` asks for new events.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

fn print_event(event: &EventView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(event)?);
        return Ok(());
    }
    println!(
        "{:>8}  {}  {:<7}  {:<22}  {:<7}  {:<24}  {:<15}  {}",
        event.seq,
        event.time,
        event.severity,
        event.kind,
        event.outcome,
        event.actor,
        event.source.as_deref().unwrap_or("-"),
        event.details
    );
    Ok(())
}

async fn page(
    session: &mut Session<'_>,
    after: u64,
    kind: Option<String>,
    device: Option<String>,
    limit: usize,
) -> anyhow::Result<(Vec<EventView>, Option<u64>)> {
    match session
        .run(Command::AuditSearch {
            after,
            kind,
            device,
            limit,
        })
        .await?
    {
        Outcome::AuditPage(page) => Ok((page.events, page.next)),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

pub(super) async fn audit(command: AuditCommand, config: &Config) -> anyhow::Result<()> {
    let mut session = Session::new(config);
    let result = run_audit(command, &mut session).await;
    session.close().await?;
    result
}

async fn run_audit(command: AuditCommand, session: &mut Session<'_>) -> anyhow::Result<()> {
    match command {
        AuditCommand::Tail {
            lines,
            follow,
            json,
        } => {
            let Outcome::AuditPage(tail) = session.run(Command::AuditTail { count: lines }).await?
            else {
                anyhow::bail!("unexpected answer");
            };
            let mut last = 0;
            for event in &tail.events {
                print_event(event, json)?;
                last = event.seq;
            }
            if !follow {
                return Ok(());
            }
            if session.is_local() {
                anyhow::bail!(
                    "--follow needs a running server (no server answered on the admin socket)"
                );
            }
            loop {
                tokio::time::sleep(FOLLOW_EVERY).await;
                loop {
                    let (events, next) = page(session, last, None, None, MAX_PAGE).await?;
                    for event in &events {
                        print_event(event, json)?;
                        last = event.seq;
                    }
                    std::io::stdout().flush()?;
                    match next {
                        Some(next) => last = last.max(next),
                        None => break,
                    }
                }
            }
        }
        AuditCommand::Search {
            kind,
            device,
            after,
            limit,
            json,
        } => {
            if !(1..=MAX_PAGE).contains(&limit) {
                anyhow::bail!("--limit must be between 1 and {MAX_PAGE}");
            }
            let (events, next) = page(session, after, kind, device, limit).await?;
            for event in &events {
                print_event(event, json)?;
            }
            if let Some(next) = next {
                eprintln!("more may follow: continue with --after {next}");
            }
            Ok(())
        }
        AuditCommand::Export {
            kind,
            device,
            after,
            output,
        } => {
            let mut out: Box<dyn std::io::Write> = match &output {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(path)
                        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let mut cursor = after;
            let mut written = 0u64;
            loop {
                let (events, next) =
                    page(session, cursor, kind.clone(), device.clone(), MAX_PAGE).await?;
                for event in &events {
                    serde_json::to_writer(&mut out, event)?;
                    out.write_all(b"\n")?;
                    cursor = event.seq;
                    written += 1;
                }
                match next {
                    Some(next) => cursor = cursor.max(next),
                    None => break,
                }
            }
            out.flush()?;
            drop(out);
            if let Some(path) = output {
                std::fs::File::open(&path)?.sync_all()?;
                eprintln!("exported {written} events to {}", path.display());
            }
            Ok(())
        }
        AuditCommand::Verify { json } => {
            let report = if let Some(services) = session.local_services().await? {
                // Over the file directly: a progress bar on a terminal.
                let audit = services.audit.clone();
                let bar = super::backup::progress_bar("verify");
                let mut progress = super::backup::follow(&bar);
                let report =
                    tokio::task::spawn_blocking(move || audit.verify_report(&mut progress)).await?;
                bar.finish_and_clear();
                report?
            } else {
                let Outcome::AuditVerified(report) = session.run(Command::AuditVerify).await?
                else {
                    anyhow::bail!("unexpected answer");
                };
                report
            };
            if json {
                print_json(&report)?;
            } else if report.ok {
                println!(
                    "audit log verified: {} records ({} to {}), {} pruned before them",
                    report.records,
                    report
                        .first_seq
                        .map_or_else(|| "-".into(), |s| s.to_string()),
                    report
                        .last_seq
                        .map_or_else(|| "-".into(), |s| s.to_string()),
                    report.pruned
                );
                if let (Some(seq), Some(tag)) = (report.last_seq, &report.head_tag) {
                    println!("head: {seq} {tag}");
                }
                for tip in &report.chains {
                    println!(
                        "chain {}: {} records, head {}",
                        tip.chain, tip.records, tip.head_tag
                    );
                }
                if report.checkpoints > 0 {
                    println!("{} checkpoints bound the nodes' chains", report.checkpoints);
                }
            }
            if !report.ok {
                anyhow::bail!(
                    "the audit log does not verify: first bad record {}: {}",
                    report.bad_seq.map_or_else(|| "?".into(), |s| s.to_string()),
                    report.problem.as_deref().unwrap_or("unknown problem")
                );
            }
            Ok(())
        }
    }
}

pub(super) async fn bans(command: BansCommand, config: &Config) -> anyhow::Result<()> {
    let mut session = Session::new(config);
    let result = match command {
        BansCommand::List { json } => match session.run(Command::BansList).await {
            Ok(Outcome::BanList { bans }) if json => print_json(&bans),
            Ok(Outcome::BanList { bans }) => {
                println!(
                    "{:<28}  {:<6}  {:<20}  {:<20}  {:<8}  REASON",
                    "KEY", "ACTIVE", "SINCE", "UNTIL", "OFFENCES"
                );
                for b in bans {
                    println!(
                        "{:<28}  {:<6}  {:<20}  {:<20}  {:<8}  {}",
                        b.key,
                        if b.active { "yes" } else { "no" },
                        b.since,
                        b.until,
                        b.offences,
                        b.reason
                    );
                }
                Ok(())
            }
            Ok(other) => Err(anyhow::anyhow!("unexpected answer {other:?}")),
            Err(err) => Err(err),
        },
        BansCommand::Lift { key } => match session.run(Command::BansLift { key }).await {
            Ok(Outcome::BanLifted(ban)) => {
                println!("lifted the ban on {}", ban.key);
                Ok(())
            }
            Ok(other) => Err(anyhow::anyhow!("unexpected answer {other:?}")),
            Err(err) => Err(err),
        },
    };
    session.close().await?;
    result
}
