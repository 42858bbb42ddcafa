//! The command line: clap definitions, and one function per subcommand.
//!
//! Management commands build a `manage::Command`, send it to a running server through
//! the admin socket, or, when no server is listening, open the data file themselves and
//! run the same command in-process. Output for scripts goes to stdout (a created token is
//! the only thing printed); logs and errors go to stderr.

mod audit;
mod backup;
mod doctor;
mod storage;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::admin_socket::{self, Reply};
use crate::clock::{SharedClock, SystemClock, format_rfc3339};
use crate::config::{Config, Env, Flags, Layer};
use crate::manage::{self, Command, KeyText, Outcome};
use crate::pairing::ServerIdentity;
use crate::services::Services;
use crate::store::seal::MasterKey;

#[derive(Debug, Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "Device pairing, tokens, rate limits, audit and TLS for a small app, in one binary",
    long_about = None
)]
pub(crate) struct Cli {
    /// The data file [env: GATEHOUSE_DATA] [default: $STATE_DIRECTORY/gatehouse.redb, else ./gatehouse.redb]
    #[arg(long, global = true, value_name = "PATH")]
    data: Option<PathBuf>,
    /// A PostgreSQL database shared by several nodes instead of the data file, postgres://USER@HOST/DB (password from storage.password_file or ~/.pgpass) [env: GATEHOUSE_STORAGE]
    #[arg(long, global = true, value_name = "URL")]
    storage: Option<String>,
    /// A TOML configuration file (see schema/config.md) [env: GATEHOUSE_CONFIG]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The master key file [env: GATEHOUSE_MASTER_KEY_FILE] [default: $CREDENTIALS_DIRECTORY/master-key, else <data>.key]
    #[arg(long, global = true, value_name = "FILE")]
    master_key_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Default, clap::Args)]
struct ServeArgs {
    /// Address to listen on [env: GATEHOUSE_LISTEN] [default: 127.0.0.1:8443, with a domain [::]:443]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// TLS mode: self-signed, acme, files or off (off only on a loopback address) [env: GATEHOUSE_TLS] [default: acme with a domain, else self-signed]
    #[arg(long, value_name = "MODE")]
    tls: Option<String>,
    /// A name to serve and order certificates for; repeat or separate with commas [env: GATEHOUSE_DOMAIN]
    #[arg(long = "domain", value_name = "NAME")]
    domains: Vec<String>,
    /// The ACME directory URL, or letsencrypt / letsencrypt-staging [env: GATEHOUSE_ACME_DIRECTORY] [default: letsencrypt]
    #[arg(long, value_name = "URL")]
    acme_directory: Option<String>,
    /// Contact address for the ACME account [env: GATEHOUSE_ACME_EMAIL]
    #[arg(long, value_name = "ADDR")]
    acme_email: Option<String>,
    /// PEM file of CA certificates to trust for the ACME directory's HTTPS (a private CA) [env: GATEHOUSE_ACME_CA_ROOT]
    #[arg(long, value_name = "FILE")]
    acme_ca_root: Option<PathBuf>,
    /// files mode: the PEM certificate chain, leaf first [env: GATEHOUSE_TLS_CERT_FILE]
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// files mode: the PEM private key [env: GATEHOUSE_TLS_KEY_FILE]
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The app behind the front door: requests gatehouse does not answer go there once their device token is verified; http://HOST:PORT or unix:/PATH [env: GATEHOUSE_UPSTREAM]
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Proxies (CIDR or address; repeat or separate with commas) whose X-Forwarded-For and Forwarded headers name the client [env: GATEHOUSE_TRUSTED_PROXIES]
    #[arg(long = "trusted-proxies", value_name = "CIDR")]
    trusted_proxies: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum StorageCommand {
    /// Copy a data file (the current one, or a backup) into an empty PostgreSQL
    /// database, all of it or nothing; nodes then serve it with --storage URL and the
    /// same master key
    Copy {
        /// The data file or backup to copy [default: the data file]
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
        /// The database, postgres://USER@HOST/DB (password from storage.password_file or
        /// ~/.pgpass); it must hold no gatehouse data
        #[arg(long, value_name = "URL")]
        to: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration (file, environment, flags) and print every setting's
    /// effective value and where it came from; exits 2 when it is invalid
    Check {
        /// One JSON object per line: key, value, source
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run the server (zero-config: HTTPS with a self-signed certificate on 127.0.0.1:8443;
    /// with --domain: ACME certificates on [::]:443 and a redirect on port 80)
    Serve(ServeArgs),
    /// Check the configuration without starting anything
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage admin tokens
    #[command(subcommand)]
    AdminToken(AdminTokenCommand),
    /// Manage admin users (name and password, for signing in to the admin UI)
    #[command(subcommand)]
    AdminUser(AdminUserCommand),
    /// Manage the signing keys (JWKS)
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage API clients (callers of /v1/introspect)
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// Manage paired devices
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Pair a device
    #[command(subcommand)]
    Pair(PairCommand),
    /// Read and check the audit log
    #[command(subcommand)]
    Audit(AuditCommand),
    /// List and lift lockout bans
    #[command(subcommand)]
    Bans(BansCommand),
    /// Write a consistent, checked backup of the data file (while the server runs, too)
    Backup {
        /// The backup file to create (refused if it exists)
        file: PathBuf,
    },
    /// Replace the data file with a backup (the server must be stopped)
    Restore {
        /// The backup file
        file: PathBuf,
        /// The master key the backup was sealed under, when it is not the current one;
        /// the restored file is re-sealed under the current key
        #[arg(long, value_name = "FILE")]
        backup_key_file: Option<PathBuf>,
    },
    /// List and run scheduled jobs
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Move the store between the data file and a PostgreSQL database
    #[command(subcommand)]
    Storage(StorageCommand),
    /// Check the master key, data file, clock, ports, TLS and DNS, and say what to fix
    Doctor,
    /// Re-seal every secret in the data file under a new master key
    Rekey {
        /// The new key file; created (mode 0600) with a fresh random key if it does not exist
        #[arg(long, value_name = "FILE")]
        new_key_file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AdminTokenCommand {
    /// Create a token and print it (only the token, on stdout)
    Create {
        /// A name to recognise the token by
        #[arg(long)]
        name: Option<String>,
    },
    /// List tokens (never their secrets)
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum AdminUserCommand {
    /// Add a user; the password is asked for at the terminal (twice, not echoed), or read
    /// as one line from standard input when that is not a terminal
    Add { name: String },
    /// Set a user's password (asked for the same way)
    Passwd { name: String },
    /// Remove a user
    Remove { name: String },
    /// List users (never their passwords or hashes)
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// List signing keys and their states (next, active, retiring, revoked)
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Make the next key active; the active key keeps verifying until its tokens expire
    Rotate {
        /// Rotate even if apps may not have fetched the next key yet (an emergency)
        #[arg(long)]
        now: bool,
    },
    /// Revoke a key: every token it signed is refused at once
    Revoke {
        /// The key's id (base64url: it may begin with '-')
        #[arg(allow_hyphen_values = true)]
        kid: String,
    },
}

#[derive(Debug, Subcommand)]
enum ClientsCommand {
    /// Register a client; prints its id and secret (the secret only now)
    Create {
        /// A name to recognise the client by
        #[arg(long)]
        name: String,
    },
    /// List clients (never their secrets)
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Revoke a client by its id
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// List paired devices
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show one device
    Show { id: String },
    /// Revoke a device and every token it holds
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Show the newest events
    Tail {
        /// How many events
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// Keep printing new events as they are written (needs a running server)
        #[arg(short, long)]
        follow: bool,
        /// One JSON object per line instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Find events by type and device, oldest first
    Search {
        /// An event type (device.revoked) or a family (device.*)
        #[arg(long = "type", value_name = "TYPE")]
        kind: Option<String>,
        /// Only events concerning this device
        #[arg(long)]
        device: Option<String>,
        /// Only events after this sequence number
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many events (1 to 1000)
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Write events as JSON lines (to stdout, or to a file)
    Export {
        /// An event type (device.revoked) or a family (device.*)
        #[arg(long = "type", value_name = "TYPE")]
        kind: Option<String>,
        /// Only events concerning this device
        #[arg(long)]
        device: Option<String>,
        /// Only events after this sequence number
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// The file to write (created; refused if it exists) [default: stdout]
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Check every record's tag and link; fails naming the first bad sequence number
    Verify {
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// List jobs: schedule, last run, outcome, next run
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Run a job now (rotate_keys, prune_audit, prune_revocations, prune_expired, backup)
    Run { name: String },
}

#[derive(Debug, Subcommand)]
enum BansCommand {
    /// List active bans and those still remembered
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Lift a ban now, by its key (ip:203.0.113.7, ip:2001:db8:1:2::/64)
    Lift { key: String },
}

#[derive(Debug, Subcommand)]
enum PairCommand {
    /// Open a pairing session; print its QR code and pairing URI
    New {
        /// A name for the device to be paired
        #[arg(long)]
        name: Option<String>,
        /// How long the session stays open, such as 5m (30s to 1h) [default: pairing.ttl]
        #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
        ttl: Option<std::time::Duration>,
        /// Pair this existing device again (one that needs pairing, or a replaced phone)
        /// instead of creating a new one; its other tokens are revoked when it is claimed
        #[arg(long, value_name = "DEVICE_ID")]
        device: Option<String>,
    },
    /// Approve a device that asked with the device authorization grant (RFC 8628): the
    /// user code it shows (BCDF-GHJK) creates the device, whose tokens go to its next poll
    Approve {
        /// The code the device shows; case, dash and spaces do not matter
        user_code: String,
        /// The new device's name [default: the client_id it sent]
        #[arg(long)]
        name: Option<String>,
    },
    /// Deny a device that asked with the device authorization grant
    Deny {
        /// The code the device shows
        user_code: String,
    },
}

fn parse_ttl(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (expected a duration such as 5m)"))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let serve = match &cli.command {
        Commands::Serve(args) => Some(args),
        _ => None,
    };
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let mut flags = Flags::new(cli.config.clone())
        .with_some("--data", path(&cli.data))
        .with_some("--storage", cli.storage.clone())
        .with_some("--master-key-file", path(&cli.master_key_file));
    if let Some(a) = serve {
        flags = flags
            .with_some("--listen", a.listen.clone())
            .with_some("--tls", a.tls.clone())
            .with_some(
                "--domain",
                (!a.domains.is_empty()).then(|| a.domains.join(",")),
            )
            .with_some("--acme-directory", a.acme_directory.clone())
            .with_some("--acme-email", a.acme_email.clone())
            .with_some("--upstream", a.upstream.clone())
            .with_some(
                "--trusted-proxies",
                (!a.trusted_proxies.is_empty()).then(|| a.trusted_proxies.join(",")),
            )
            .with_some("--acme-ca-root", path(&a.acme_ca_root))
            .with_some("--tls-cert", path(&a.tls_cert))
            .with_some("--tls-key", path(&a.tls_key));
    }
    let config = match Config::load(&flags, &Env::from_process()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("gatehouse: configuration error: {err}");
            return ExitCode::from(2);
        }
    };
    // A command other than `serve` speaks through its output and its errors; its log
    // lines (a repair, a key beside the file) are for whoever asks for them with
    // `log.level` (GATEHOUSE_LOG).
    let quiet = serve.is_none() && matches!(config.origin_of("log.level"), Layer::Default);
    let filter = if quiet {
        "off"
    } else {
        config.log_filter.as_str()
    };
    crate::telemetry::init(config.log_format, filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("gatehouse: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gatehouse: {}", describe(&err));
            exit_code(&err)
        }
    }
}

/// The error and its causes, each said once: many of our errors already name their
/// cause in their own text (`cannot create FILE: Permission denied`), and repeating the
/// chain after it would print the operating system's words twice.
fn describe(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// 2 for a usage error (what the command was given is refused as invalid, as clap and the
/// configuration do), 1 for every other failure.
fn exit_code(err: &anyhow::Error) -> ExitCode {
    let invalid = crate::error_kind::ErrorKind::Invalid.code();
    match err.downcast_ref::<manage::CommandError>() {
        Some(refused) if refused.code == invalid => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

async fn run(command: Commands, config: Config) -> anyhow::Result<()> {
    match command {
        Commands::Serve(_) => Ok(crate::app::serve(config).await?),
        Commands::AdminToken(AdminTokenCommand::Create { name }) => {
            let outcome = run_command(Command::AdminTokenCreate { name }, &config).await?;
            if let Outcome::TokenCreated(issued) = outcome {
                println!("{}", issued.token);
                eprintln!("created admin token {} ({})", issued.id, issued.name);
            }
            Ok(())
        }
        Commands::AdminToken(AdminTokenCommand::List { json }) => {
            if let Outcome::TokenList { tokens } =
                run_command(Command::AdminTokenList, &config).await?
            {
                if json {
                    println!("{}", serde_json::to_string_pretty(&tokens)?);
                } else {
                    print_token_table(&tokens);
                }
            }
            Ok(())
        }
        Commands::AdminToken(AdminTokenCommand::Revoke { id }) => {
            if let Outcome::TokenRevoked(info) =
                run_command(Command::AdminTokenRevoke { id }, &config).await?
            {
                println!("revoked admin token {} ({})", info.id, info.name);
            }
            Ok(())
        }
        Commands::AdminUser(command) => admin_user(command, &config).await,
        Commands::Rekey { new_key_file } => rekey(&new_key_file, &config).await,
        Commands::Keys(command) => keys(command, &config).await,
        Commands::Clients(command) => clients(command, &config).await,
        Commands::Devices(command) => devices(command, &config).await,
        Commands::Audit(command) => audit::audit(command, &config).await,
        Commands::Bans(command) => audit::bans(command, &config).await,
        Commands::Backup { file } => backup::backup(&file, &config).await,
        Commands::Doctor => doctor::doctor(&config).await,
        Commands::Config(ConfigCommand::Check { json }) => {
            config_check(&config, json);
            Ok(())
        }
        Commands::Restore {
            file,
            backup_key_file,
        } => backup::restore(&file, backup_key_file.as_deref(), &config).await,
        Commands::Jobs(command) => backup::jobs(command, &config).await,
        Commands::Storage(StorageCommand::Copy { from, to }) => {
            storage::copy(from.as_deref(), &to, &config).await
        }
        Commands::Pair(PairCommand::New { name, ttl, device }) => {
            let command = Command::PairNew {
                name,
                ttl_seconds: ttl.map(|d| d.as_secs()),
                device,
            };
            if let Outcome::PairingOpened(session) = run_command(command, &config).await? {
                // The code first, then the URI as the last line for scripts.
                print!("{}", crate::qr::terminal(&session.pairing_uri)?);
                println!("{}", session.pairing_uri);
                eprintln!(
                    "pairing session {} open until {}",
                    session.session_id,
                    format_rfc3339(session.expires_at_ms)
                );
            }
            Ok(())
        }
        Commands::Pair(PairCommand::Approve { user_code, name }) => {
            if let Outcome::DeviceGrant(grant) =
                run_command(Command::PairApprove { user_code, name }, &config).await?
            {
                println!(
                    "approved: device {} ({}); its tokens go to it at its next poll",
                    grant.device_id.as_deref().unwrap_or("-"),
                    grant.device_name.as_deref().unwrap_or("-"),
                );
            }
            Ok(())
        }
        Commands::Pair(PairCommand::Deny { user_code }) => {
            if let Outcome::DeviceGrant(grant) =
                run_command(Command::PairDeny { user_code }, &config).await?
            {
                println!(
                    "denied the device that asked from {} (grant {})",
                    grant.requested_from, grant.id
                );
            }
            Ok(())
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

async fn keys(command: KeysCommand, config: &Config) -> anyhow::Result<()> {
    match command {
        KeysCommand::List { json } => {
            if let Outcome::KeyList { keys } = run_command(Command::KeysList, config).await? {
                if json {
                    return print_json(&keys);
                }
                println!(
                    "{:<43}  {:<5}  {:<8}  {:<20}  UNTIL",
                    "KID", "ALG", "STATE", "CREATED"
                );
                for k in keys {
                    let state = serde_json::to_value(k.state)?;
                    println!(
                        "{:<43}  {:<5}  {:<8}  {:<20}  {}",
                        k.kid,
                        k.alg,
                        state.as_str().unwrap_or_default(),
                        k.created_at,
                        k.verify_until.unwrap_or_default()
                    );
                }
            }
        }
        KeysCommand::Rotate { now } => {
            if let Outcome::KeyRotated(report) =
                run_command(Command::KeysRotate { now }, config).await?
            {
                println!("active: {}", report.activated);
                if let Some(kid) = report.retiring {
                    println!("retiring: {kid} (verifies until its tokens expire)");
                }
                println!("next: {}", report.next);
                for kid in report.retired {
                    println!("retired: {kid}");
                }
            }
        }
        KeysCommand::Revoke { kid } => {
            if let Outcome::KeyRevoked(info) =
                run_command(Command::KeysRevoke { kid }, config).await?
            {
                println!(
                    "revoked signing key {}; every token it signed is now refused",
                    info.kid
                );
            }
        }
    }
    Ok(())
}

async fn clients(command: ClientsCommand, config: &Config) -> anyhow::Result<()> {
    match command {
        ClientsCommand::Create { name } => {
            if let Outcome::ClientCreated(client) =
                run_command(Command::ClientCreate { name }, config).await?
            {
                println!("client_id={}", client.client_id);
                println!("client_secret={}", client.client_secret);
                eprintln!(
                    "registered client {} ({}); the secret is shown only now",
                    client.client_id, client.name
                );
            }
        }
        ClientsCommand::List { json } => {
            if let Outcome::ClientList { clients } =
                run_command(Command::ClientList, config).await?
            {
                if json {
                    return print_json(&clients);
                }
                println!("{:<36}  {:<24}  {:<20}  STATUS", "ID", "NAME", "CREATED");
                for c in clients {
                    let status = c
                        .revoked_at
                        .map_or_else(|| "active".into(), |at| format!("revoked {at}"));
                    println!(
                        "{:<36}  {:<24}  {:<20}  {status}",
                        c.client_id.to_string(),
                        c.name,
                        c.created_at
                    );
                }
            }
        }
        ClientsCommand::Revoke { id } => {
            if let Outcome::ClientRevoked(info) =
                run_command(Command::ClientRevoke { id }, config).await?
            {
                println!("revoked client {} ({})", info.client_id, info.name);
            }
        }
    }
    Ok(())
}

async fn devices(command: DevicesCommand, config: &Config) -> anyhow::Result<()> {
    match command {
        DevicesCommand::List { json } => {
            if let Outcome::DeviceList { devices } =
                run_command(Command::DevicesList, config).await?
            {
                if json {
                    return print_json(&devices);
                }
                println!(
                    "{:<36}  {:<24}  {:<10}  {:<13}  {:<20}  REASON",
                    "ID", "NAME", "PLATFORM", "STATUS", "LAST SEEN"
                );
                for d in devices {
                    println!(
                        "{:<36}  {:<24}  {:<10}  {:<13}  {:<20}  {}",
                        d.id.to_string(),
                        d.name,
                        d.platform,
                        d.status,
                        d.last_seen,
                        d.status_reason.as_deref().unwrap_or("")
                    );
                }
            }
        }
        DevicesCommand::Show { id } => {
            if let Outcome::DeviceShown(device) =
                run_command(Command::DevicesShow { id }, config).await?
            {
                return print_json(&device);
            }
        }
        DevicesCommand::Revoke { id } => {
            if let Outcome::DeviceRevoked(device) =
                run_command(Command::DevicesRevoke { id }, config).await?
            {
                println!(
                    "revoked device {} ({}) and all its tokens",
                    device.id, device.name
                );
            }
        }
    }
    Ok(())
}

fn print_token_table(tokens: &[crate::admin_tokens::AdminTokenInfo]) {
    println!(
        "{:<16}  {:<24}  {:<20}  {:<20}  STATUS",
        "ID", "NAME", "CREATED", "LAST USED"
    );
    for t in tokens {
        let status = match t.revoked_at_ms {
            Some(at) => format!("revoked {}", format_rfc3339(at)),
            None => "active".into(),
        };
        println!(
            "{:<16}  {:<24}  {:<20}  {:<20}  {}",
            t.id,
            t.name,
            format_rfc3339(t.created_at_ms),
            t.last_used_at_ms
                .map_or_else(|| "never".into(), format_rfc3339),
            status
        );
    }
}

async fn rekey(new_key_file: &std::path::Path, config: &Config) -> anyhow::Result<()> {
    // Checked first so a mistyped --data leaves no stray key file behind. A running
    // server holds an existing file, so this holds on both paths.
    if config.storage.url.is_none() && !config.data_path.exists() {
        return Err(crate::app::AppError::NoDataFile(config.data_path.clone()).into());
    }
    let key = if new_key_file.exists() {
        MasterKey::load(new_key_file)?
    } else {
        let key = MasterKey::create_file(new_key_file)?;
        eprintln!("wrote a new master key to {}", new_key_file.display());
        key
    };
    let outcome = run_command(
        Command::Rekey {
            new_key: KeyText(key.to_text()),
        },
        config,
    )
    .await?;
    if let Outcome::Rekeyed {
        secrets,
        fingerprint,
        key_file_replaced,
        key_file_to_replace,
    } = outcome
    {
        println!("re-sealed {secrets} secret(s); the data file now opens with key {fingerprint}");
        if let Some(path) = key_file_replaced {
            println!("{} now holds the new key", path.display());
        }
        if let Some(path) = key_file_to_replace {
            println!(
                "IMPORTANT: gatehouse reads its key from {}. Before the next start, put {} \
                 where that key comes from: under systemd, the LoadCredential= source file \
                 (e.g. /etc/gatehouse/master-key), not the read-only copy systemd makes; \
                 otherwise the file GATEHOUSE_MASTER_KEY_FILE names. Keep the old key as \
                 long as you keep backups made before this rekey.",
                path.display(),
                new_key_file.display()
            );
        }
    }
    Ok(())
}

/// A new password: asked twice without echo at a terminal, else one line of stdin.
fn read_password(name: &str) -> anyhow::Result<manage::KeyText> {
    use std::io::IsTerminal;
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("password for {name}: "))?;
        let again = rpassword::prompt_password("again: ")?;
        if first != again {
            anyhow::bail!("the two passwords differ; nothing changed");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line.trim_end_matches(['\n', '\r']).to_string()
    };
    Ok(manage::KeyText(password))
}

async fn admin_user(command: AdminUserCommand, config: &Config) -> anyhow::Result<()> {
    match command {
        AdminUserCommand::Add { name } => {
            let password = read_password(&name)?;
            if let Outcome::AdminUser(user) =
                run_command(Command::AdminUserAdd { name, password }, config).await?
            {
                println!("added admin user {}", user.name);
            }
        }
        AdminUserCommand::Passwd { name } => {
            let password = read_password(&name)?;
            if let Outcome::AdminUser(user) =
                run_command(Command::AdminUserPasswd { name, password }, config).await?
            {
                println!("changed the password of {}", user.name);
            }
        }
        AdminUserCommand::Remove { name } => {
            if let Outcome::AdminUserRemoved { name } =
                run_command(Command::AdminUserRemove { name }, config).await?
            {
                println!("removed admin user {name}");
            }
        }
        AdminUserCommand::List { json } => {
            if let Outcome::AdminUserList { users } =
                run_command(Command::AdminUserList, config).await?
            {
                if json {
                    println!("{}", serde_json::to_string_pretty(&users)?);
                } else {
                    println!("{:<24}  {:<20}  PASSWORD CHANGED", "NAME", "CREATED");
                    for u in users {
                        println!(
                            "{:<24}  {:<20}  {}",
                            u.name, u.created_at, u.password_changed_at
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs `command` in the running server if there is one, else against the file directly.
async fn run_command(command: Command, config: &Config) -> anyhow::Result<Outcome> {
    let mut session = Session::new(config);
    let result = session.run(command).await;
    session.close().await?;
    result
}

/// A series of management commands: through the admin socket while a server answers,
/// else over the data file opened once for the whole series.
pub(crate) struct Session<'c> {
    config: &'c Config,
    local: Option<(crate::store::Store, Services)>,
}

impl<'c> Session<'c> {
    pub(crate) fn new(config: &'c Config) -> Self {
        Self {
            config,
            local: None,
        }
    }

    /// True once the commands run over the data file (no server holds it).
    pub(crate) fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// The services over the data file when no server answers on the admin socket
    /// (opening the file then); `None` while a server runs.
    pub(crate) async fn local_services(&mut self) -> anyhow::Result<Option<&Services>> {
        if self.local.is_none() {
            if admin_socket::request(&self.config.admin_socket, &Command::Ping)
                .await?
                .is_some()
            {
                return Ok(None);
            }
            self.local = Some(open_local(self.config).await?);
        }
        Ok(self.local.as_ref().map(|(_, services)| services))
    }

    pub(crate) async fn run(&mut self, command: Command) -> anyhow::Result<Outcome> {
        if self.local.is_none() {
            if let Some(reply) = admin_socket::request(&self.config.admin_socket, &command).await? {
                return match reply {
                    Reply::Ok(outcome) => Ok(outcome),
                    Reply::Error(err) => Err(err.into()),
                };
            }
            self.local = Some(open_local(self.config).await?);
        }
        let Some((_, services)) = &self.local else {
            anyhow::bail!("the data file is not open");
        };
        Ok(manage::execute(command, services).await?)
    }

    pub(crate) async fn close(self) -> anyhow::Result<()> {
        if let Some((store, services)) = self.local {
            drop(services);
            tokio::task::spawn_blocking(move || store.close()).await?;
        }
        Ok(())
    }
}

async fn open_local(config: &Config) -> anyhow::Result<(crate::store::Store, Services)> {
    let clock: SharedClock = Arc::new(SystemClock);
    let store = crate::app::open_existing_store(config, clock.clone())
        .await
        .with_context(|| {
            let store = if config.storage.url.is_some() {
                "the database"
            } else {
                "the data file"
            };
            format!(
                "no server answered on {}, and {store} could not be opened directly",
                config.admin_socket.display()
            )
        })?;
    match local_services(config, &store, clock).await {
        Ok(services) => Ok((store, services)),
        Err(err) => {
            let closing = store.clone();
            tokio::task::spawn_blocking(move || closing.close()).await?;
            Err(err.into())
        }
    }
}

/// The services over a data file this process opened (no server is running).
async fn local_services(
    config: &Config,
    store: &crate::store::Store,
    clock: SharedClock,
) -> Result<Services, manage::CommandError> {
    let internal = |err: &dyn std::fmt::Display| {
        manage::CommandError::new(crate::error_kind::ErrorKind::Internal, err.to_string())
    };
    // A pairing URI for a self-signed server must carry the pin of the stored certificate.
    let pin = match config.tls_mode {
        crate::config::TlsMode::SelfSigned => {
            crate::tls::stored_pin(store).map_err(|e| internal(&e))?
        }
        crate::config::TlsMode::Acme
        | crate::config::TlsMode::Files
        | crate::config::TlsMode::Off => None,
    };
    let server = ServerIdentity {
        url: crate::services::issuer(config, config.server.listen),
        pin,
    };
    Services::start(store.clone(), clock, config, server, None)
        .await
        .map_err(|e| internal(&e))
}

/// `gatehouse config check`: the configuration loaded (an invalid one never gets here:
/// loading it failed with exit code 2), every setting's effective value and its source.
fn config_check(config: &Config, json: bool) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    for (setting, value, layer) in config.effective() {
        let source = layer.to_string();
        let written = if json {
            let line = serde_json::json!({
                "key": setting.key,
                "value": value,
                "source": source,
            });
            writeln!(out, "{line}")
        } else {
            let value = value.unwrap_or_else(|| "(not set)".into());
            writeln!(out, "{:<36} {value:<40} {source}", setting.key)
        };
        // A reader that stopped early (`| head`) is no error of the configuration.
        if written.is_err() {
            return;
        }
    }
    for (n, route) in config.front.routes.iter().enumerate() {
        let key = format!("routes[{}]", n + 1);
        let upstream = route
            .upstream
            .as_ref()
            .map_or_else(|| "upstream.url".to_string(), ToString::to_string);
        let rate = match route.rate {
            crate::config::Rate::Off => "off".to_string(),
            crate::config::Rate::Limit { requests, window } => {
                format!("{requests}/{}", humantime::format_duration(window))
            }
        };
        let written = if json {
            let line = serde_json::json!({
                "key": key,
                "value": {
                    "path": route.path,
                    "host": route.host,
                    "upstream": upstream,
                    "auth": route.auth.as_str(),
                    "rate": rate,
                },
                "source": "config file",
            });
            writeln!(out, "{line}")
        } else {
            let value = format!(
                "{} -> {upstream} (auth {}, rate {rate})",
                route.label(),
                route.auth.as_str()
            );
            writeln!(out, "{key:<36} {value:<40} config file")
        };
        if written.is_err() {
            return;
        }
    }
    if !json {
        eprintln!("configuration is valid");
    }
}

#[cfg(test)]
mod describe_tests {
    use super::describe;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot create {path}: {source}")]
    struct Named {
        path: &'static str,
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::from_raw_os_error(13);
        let err = anyhow::Error::new(Named {
            path: "/x",
            source: io,
        });
        let text = describe(&err);
        assert_eq!(text.matches("os error 13").count(), 1, "{text}");
        let chained = anyhow::anyhow!("inner cause").context("outer step");
        assert_eq!(describe(&chained), "outer step: inner cause");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kid_may_begin_with_a_hyphen() {
        // Key ids are base64url thumbprints: about one in 64 begins with '-'.
        let cli = Cli::try_parse_from(["gatehouse", "keys", "revoke", "-Wq3xIqZ"]);
        assert!(
            matches!(cli, Ok(Cli { command: Commands::Keys(KeysCommand::Revoke { ref kid }), .. }) if kid == "-Wq3xIqZ"),
            "{cli:?}"
        );
    }
}
