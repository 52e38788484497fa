//! `weft-coordinator`: serve the overlay's control plane, or administer a running one.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use weft_coordinator::{
    AdminClient, AuthKeyRequest, Coordinator, FileConfig, FlowQuery, FlowView, Limits, NodeView,
    Pin, ServeOptions,
};
use weft_proto::flows::{FlowPath, FlowVerdict};

/// The control listener's address unless flags or the configuration file say otherwise.
const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 7443);

#[derive(Debug, Parser)]
#[command(
    name = "weft-coordinator",
    version,
    about = "weft's coordinator: admits nodes and streams their netmaps"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator.
    Serve(Box<ServeArgs>),
    /// Print the coordinator's public key (nodes pin it); creates the key if absent.
    Key {
        #[command(flatten)]
        dir: DataDir,
    },
    /// Manage pre-auth keys.
    Authkey {
        #[command(subcommand)]
        command: AuthkeyCommand,
    },
    /// Manage nodes.
    Nodes {
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// Manage the people who log in through the identity provider.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Manage the policy in force.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// List the audit trail (policy installs, auth keys, nodes, users, logins), or verify it.
    ///
    /// `audit` lists the entries; `audit verify` checks that none was edited, removed or
    /// reordered, exits 1 naming the first that was, and prints the head to pin elsewhere.
    Audit {
        /// `verify` to check the chain instead of listing it.
        #[arg(value_enum)]
        action: Option<AuditAction>,
        #[command(flatten)]
        dir: DataDir,
        /// List only entries from this time on: RFC 3339 (`2026-01-31T09:00:00Z`) or a
        /// duration before now (`1h`, `7d`).
        #[arg(long, value_name = "TIME|DURATION")]
        since: Option<String>,
        /// With `verify`: fail unless the chain still holds this entry, as an earlier
        /// `audit verify` printed it (`SEQ:HASH`).
        #[arg(long, value_name = "SEQ:HASH")]
        pin: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the flow records this coordinator keeps, newest last: what nodes' filters
    /// accepted, denied or would have denied (audit mode), with both ends' identities.
    ///
    /// `--src` and `--dst` take a node name or id (`n7`), a user's email, a `tag:NAME`,
    /// a `group:idp:NAME`, a SPIFFE ID, an IP address or a CIDR prefix. Each replica
    /// answers with the records the nodes connected to it sent.
    Flows {
        #[command(flatten)]
        dir: DataDir,
        /// Who opened the flow.
        #[arg(long, value_name = "WHO")]
        src: Option<String>,
        /// Who the flow was opened to.
        #[arg(long, value_name = "WHO")]
        dst: Option<String>,
        /// What the filter decided.
        #[arg(long, value_enum)]
        verdict: Option<VerdictArg>,
        /// Only flows seen from this time on: RFC 3339 (`2026-01-31T09:00:00Z`) or a
        /// duration before now (`10m`, `1h`).
        #[arg(long, value_name = "TIME|DURATION")]
        since: Option<String>,
        /// Only the flow with this id (32 hexadecimal digits), as both of its ends report it.
        #[arg(long, value_name = "FLOWID")]
        id: Option<String>,
        /// At most this many records, the newest [default: 100].
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Print a JSON array instead of text (the format is in docs/schema/flow-record.json).
        #[arg(long)]
        json: bool,
    },
}

/// `--verdict`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum VerdictArg {
    /// An accept rule admitted it.
    Accept,
    /// A deny rule, or the default, dropped it.
    Deny,
    /// A deny rule in audit mode would have dropped it; it passed.
    AuditDeny,
    /// The reporting node opened it.
    Opened,
}

impl VerdictArg {
    fn as_str(self) -> &'static str {
        match self {
            VerdictArg::Accept => "accept",
            VerdictArg::Deny => "deny",
            VerdictArg::AuditDeny => "audit-deny",
            VerdictArg::Opened => "opened",
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AuditAction {
    /// Check the chain.
    Verify,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    dir: DataDir,
    /// The policy file. It is followed: a valid new version is installed within a second,
    /// an invalid one is logged and ignored. Without it every node is denied all traffic.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Control address: QUIC on UDP, and TLS over TCP on the same port for nodes without UDP [default: 0.0.0.0:7443].
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// TCP address of the HTTP endpoints (login, callback) [default: the --listen address].
    #[arg(long, value_name = "ADDR:PORT")]
    http_listen: Option<SocketAddr>,
    /// The configuration file (TOML); flags override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// TCP address of the Prometheus metrics endpoint (`GET /metrics`) [default: none].
    /// The metrics name no nodes or users; bind it to a private or loopback address.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<SocketAddr>,
    /// The base URL browsers reach the HTTP endpoints at (overrides `public_url`).
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// An administrator principal (e.g. `tag:admin`, `alice@example.com`); repeatable.
    /// A new policy under which an administrator who reached other nodes reaches none
    /// is refused (override with `policy set --force`).
    #[arg(long = "admin", value_name = "PRINCIPAL")]
    admins: Vec<String>,
    /// How long an ephemeral node may stay offline before it is deleted, freeing its
    /// name and addresses (e.g. `30s`, `10m`) [default: `ephemeral_timeout` or 10m].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    ephemeral_timeout: Option<Duration>,
    /// TCP connections (control sessions over TLS and HTTP together) one source address
    /// may hold, IPv6 addresses counting per /64; more are closed at once [default: 256].
    /// Raise it when many nodes without UDP share one NAT address.
    #[arg(long, value_name = "N")]
    max_connections_per_address: Option<usize>,
    /// Interactive logins that may wait at once for someone to finish them; more are
    /// refused with a message to retry [default: 1024].
    #[arg(long, value_name = "N")]
    max_pending_logins: Option<usize>,
    /// Time an HTTP client has to send a request's head, and that a kept-alive
    /// connection may wait for its next request [default: 10s].
    #[arg(long, hide = true, value_name = "DURATION", value_parser = humantime::parse_duration)]
    http_header_timeout: Option<Duration>,
    /// An HTTP connection on which nothing moves for this long is closed [default: 60s].
    #[arg(long, hide = true, value_name = "DURATION", value_parser = humantime::parse_duration)]
    http_idle_timeout: Option<Duration>,
}

#[derive(Debug, Args)]
struct DataDir {
    /// The coordinator's data directory (key, database, admin socket).
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
enum AuthkeyCommand {
    /// Create a key; its secret is the last line printed.
    Create {
        #[command(flatten)]
        dir: DataDir,
        /// A tag for every node the key admits (`tag:NAME`); repeatable.
        #[arg(long = "tag", value_name = "tag:NAME")]
        tags: Vec<String>,
        /// Admit any number of nodes instead of one.
        #[arg(long)]
        reusable: bool,
        /// Delete the admitted nodes once they have been offline for a while.
        #[arg(long)]
        ephemeral: bool,
        /// How long the key stays valid (e.g. `30m`, `1h`, `7d`).
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
        expiry: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// List the nodes.
    List {
        #[command(flatten)]
        dir: DataDir,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// End a node's login now: its peers drop it until someone runs `weft login` on it.
    Expire {
        #[command(flatten)]
        dir: DataDir,
        /// The node's id (`n7`) or name, as `nodes list` shows them; `id:n7` or `name:web` to say which.
        node: String,
    },
    /// Delete a node; its session ends and its peers forget it.
    Delete {
        #[command(flatten)]
        dir: DataDir,
        /// The node's id (`n7`) or name, as `nodes list` shows them; `id:n7` or `name:web` to say which.
        node: String,
    },
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Disable a user: every node of theirs is cut off and none can log in again.
    Disable {
        #[command(flatten)]
        dir: DataDir,
        /// The user's email address.
        email: String,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy (syntax and its tests) and install it on the running coordinator.
    ///
    /// The installed policy is kept in the coordinator's store. It stays in force until the
    /// file given to `serve --policy` changes again, or until a restart with `--policy` (the
    /// file wins then); a coordinator started without `--policy` serves it across restarts.
    /// The coordinator never writes FILE's content into the `--policy` file.
    Set {
        #[command(flatten)]
        dir: DataDir,
        /// The policy file to install.
        file: PathBuf,
        /// Install it even if it would lock out an administrator declared with `serve --admin`.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        exit_quietly_on_broken_pipe();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", weft_coordinator::error_chain(&*e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Admin commands piped into `head` end quietly, like any Unix tool, rather
/// than with a panic in `println!`; `serve` keeps ignoring SIGPIPE and
/// handles EPIPE on its sockets.
fn exit_quietly_on_broken_pipe() {
    // SAFETY: called first thing in `main`, before the runtime starts any
    // thread; the default action installs no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve(args) => {
            let ServeArgs {
                dir,
                policy,
                listen,
                http_listen,
                config,
                metrics_listen,
                public_url,
                admins,
                ephemeral_timeout,
                max_connections_per_address,
                max_pending_logins,
                http_header_timeout,
                http_idle_timeout,
            } = *args;
            let limits = limits(
                max_connections_per_address,
                max_pending_logins,
                http_header_timeout,
                http_idle_timeout,
            )?;
            let file = match &config {
                Some(path) => weft_coordinator::load_config(path)?,
                None => FileConfig::default(),
            };
            let oidc = file.oidc.as_ref().map(|o| o.resolve()).transpose()?;
            let store = file
                .store
                .as_ref()
                .map(|s| s.resolve())
                .transpose()?
                .unwrap_or_default();
            let workload_issuers = file.resolve_workload_issuers()?;
            let relays = file.resolve_relays()?;
            let flows = file.resolve_flows()?;
            let ephemeral_timeout = match ephemeral_timeout {
                Some(timeout) if timeout.is_zero() => {
                    bail!("--ephemeral-timeout must be at least one second")
                }
                Some(timeout) => timeout,
                None => file.resolve_ephemeral_timeout()?,
            };
            if let Some(addr) = metrics_listen.or(file.metrics_listen) {
                serve_metrics(addr).await?;
            }
            serve(ServeOptions {
                data_dir: dir.data_dir,
                policy: policy.or(file.policy),
                listen: listen.or(file.listen).unwrap_or(DEFAULT_LISTEN),
                http_listen: http_listen.or(file.http_listen),
                public_url: public_url.or(file.public_url),
                oidc,
                admins,
                roles: file.roles,
                store,
                workload_issuers,
                ephemeral_timeout,
                relays,
                limits,
                flows,
            })
            .await
        }
        Command::Key { dir } => {
            let key = weft_coordinator::load_or_create_key(&dir.data_dir)?;
            println!("{}", key.public_key());
            Ok(())
        }
        Command::Authkey {
            command:
                AuthkeyCommand::Create {
                    dir,
                    tags,
                    reusable,
                    ephemeral,
                    expiry,
                },
        } => {
            let request = AuthKeyRequest {
                tags,
                reusable,
                ephemeral,
                expiry_secs: expiry.as_secs().max(1),
            };
            let created = AdminClient::new(&dir.data_dir)
                .create_auth_key(&request)
                .await?;
            let tags = if created.tags.is_empty() {
                "(none)".to_owned()
            } else {
                created.tags.join(",")
            };
            let uses = if created.reusable {
                "reusable"
            } else {
                "single-use"
            };
            let ephemeral = if created.ephemeral {
                ", ephemeral nodes"
            } else {
                ""
            };
            println!(
                "auth key {} ({uses}{ephemeral}), tags {tags}, expires {}",
                created.id, created.expires
            );
            println!("{}", created.key);
            Ok(())
        }
        Command::Nodes {
            command: NodesCommand::List { dir, json },
        } => {
            let nodes = AdminClient::new(&dir.data_dir).nodes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                print_table(&nodes);
            }
            Ok(())
        }
        Command::Nodes {
            command: NodesCommand::Delete { dir, node },
        } => {
            let node = AdminClient::new(&dir.data_dir).delete_node(&node).await?;
            println!(
                "deleted node {} named {} ({})",
                node.id, node.name, node.ipv4
            );
            Ok(())
        }
        Command::Nodes {
            command: NodesCommand::Expire { dir, node },
        } => {
            let node = AdminClient::new(&dir.data_dir).expire_node(&node).await?;
            println!(
                "expired the login of node {} named {} ({})",
                node.id, node.name, node.ipv4
            );
            Ok(())
        }
        Command::Users {
            command: UsersCommand::Disable { dir, email },
        } => {
            let cut = AdminClient::new(&dir.data_dir).disable_user(&email).await?;
            println!("disabled user {email}; cut off {} node(s)", cut.len());
            Ok(())
        }
        Command::Policy {
            command: PolicyCommand::Set { dir, file, force },
        } => set_policy(&dir.data_dir, &file, force).await,
        Command::Audit {
            action: None,
            dir,
            since,
            pin,
            json,
        } => {
            if pin.is_some() {
                bail!("--pin goes with `audit verify`");
            }
            let since = since.as_deref().map(parse_since).transpose()?;
            list_audit(&dir.data_dir, since, json).await
        }
        Command::Audit {
            action: Some(AuditAction::Verify),
            dir,
            since,
            pin,
            json,
        } => {
            if since.is_some() {
                bail!("`audit verify` checks the whole chain; --since goes with `audit`");
            }
            let pin = pin.as_deref().map(parse_pin).transpose()?;
            verify_audit(&dir.data_dir, pin.as_ref(), json).await
        }
        Command::Flows {
            dir,
            src,
            dst,
            verdict,
            since,
            id,
            limit,
            json,
        } => {
            let query = FlowQuery {
                src,
                dst,
                verdict: verdict.map(|v| v.as_str().to_owned()),
                since_ms: since
                    .as_deref()
                    .map(parse_since)
                    .transpose()?
                    .map(|secs| secs.saturating_mul(1000)),
                id,
                limit,
            };
            list_flows(&dir.data_dir, &query, json).await
        }
    }
}

async fn list_flows(data_dir: &Path, query: &FlowQuery, json: bool) -> Result<()> {
    let list = AdminClient::new(data_dir).flows(query).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list.records)?);
    } else {
        let rows = list.records.iter().map(flow_row).collect();
        print_rows(
            &[
                "TIME", "VERDICT", "RULE", "SRC", "DST", "FLOW", "PATH", "BYTES", "REPORTER", "ID",
            ],
            rows,
        );
    }
    if list.more {
        eprintln!(
            "note: older records match too; raise --limit (this shows the newest {}) or narrow with --since",
            list.records.len()
        );
    }
    Ok(())
}

/// One `flows` line: time, verdict, rule line, both identities, 5-tuple,
/// path, bytes each way, who reported it, and the flow id.
fn flow_row(view: &FlowView) -> Vec<String> {
    let record = &view.kept.record;
    let time = std::time::UNIX_EPOCH + Duration::from_millis(record.start_ms);
    let mut verdict = match record.verdict {
        FlowVerdict::Accept => "accept",
        FlowVerdict::Deny => "deny",
        FlowVerdict::AuditDeny => "audit-deny",
        FlowVerdict::Opened => "opened",
    }
    .to_owned();
    if let Some(summary) = &record.summary {
        verdict.push_str(&format!(" ({} flows)", summary.flows));
    }
    let protocol = match record.protocol {
        1 => "icmp".to_owned(),
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        58 => "icmpv6".to_owned(),
        other => format!("proto-{other}"),
    };
    let path = match &record.path {
        FlowPath::Direct => "direct".to_owned(),
        FlowPath::Relay { name } => format!("relay {name}"),
        FlowPath::Unknown => "-".to_owned(),
    };
    vec![
        humantime::format_rfc3339_seconds(time).to_string(),
        verdict,
        record
            .rule
            .map_or_else(|| "-".to_owned(), |rule| format!("line {}", rule.line)),
        endpoint(&record.src_identity, view.kept.src_verified),
        endpoint(&record.dst_identity, view.kept.dst_verified),
        format!("{protocol} {} -> {}", record.src, record.dst),
        path,
        format!("{}/{}", record.to_dst.bytes, record.to_src.bytes),
        view.reporter.name.clone(),
        record.id.to_string(),
    ]
}

/// `name (identity)`; `[claimed]` when the coordinator does not know the
/// address and shows what the reporting node said.
fn endpoint(end: &weft_proto::flows::FlowEndpoint, verified: bool) -> String {
    let identity = end.identity.to_string();
    let mut text = match &end.name {
        Some(name) => format!("{name} ({identity})"),
        None if verified => identity,
        None => "?".to_owned(),
    };
    if !verified {
        text.push_str(" [claimed]");
    }
    text
}

/// `--since`: a time, or a duration before now; Unix seconds.
fn parse_since(text: &str) -> Result<u64> {
    let time = match humantime::parse_rfc3339_weak(text) {
        Ok(time) => time,
        Err(_) => {
            let ago = humantime::parse_duration(text).with_context(|| {
                format!("--since {text:?} is neither an RFC 3339 time (`2026-01-31T09:00:00Z`) nor a duration (`1h`)")
            })?;
            std::time::SystemTime::now()
                .checked_sub(ago)
                .unwrap_or(std::time::UNIX_EPOCH)
        }
    };
    Ok(time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()))
}

/// `--pin SEQ:HASH`.
fn parse_pin(text: &str) -> Result<Pin> {
    let parsed = text.split_once(':').and_then(|(seq, hash)| {
        let hash = hash.to_ascii_lowercase();
        let hex = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
        Some(Pin {
            seq: seq.parse().ok()?,
            hash,
        })
        .filter(|_| hex)
    });
    parsed.with_context(|| {
        format!("--pin {text:?} is not SEQ:HASH, an entry's number and its 64-digit hex hash as `audit verify` prints them")
    })
}

async fn list_audit(data_dir: &Path, since: Option<u64>, json: bool) -> Result<()> {
    let log = AdminClient::new(data_dir).audit(since).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&log.entries)?);
    } else {
        let rows = log
            .entries
            .iter()
            .map(|e| {
                vec![
                    e.seq.to_string(),
                    e.time_rfc3339(),
                    e.actor.to_string(),
                    e.event.to_string(),
                ]
            })
            .collect();
        print_rows(&["SEQ", "TIME", "ACTOR", "EVENT"], rows);
    }
    if log.failed_appends > 0 {
        eprintln!(
            "warning: the coordinator failed to record {} event(s) since it started; its log names them",
            log.failed_appends
        );
    }
    Ok(())
}

async fn verify_audit(data_dir: &Path, pin: Option<&Pin>, json: bool) -> Result<()> {
    let verification = AdminClient::new(data_dir).verify_audit(pin).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&verification)?);
    }
    if let Some(problem) = &verification.problem {
        bail!(
            "the audit trail fails verification: {problem} ({} entries before it are intact)",
            verification.entries
        );
    }
    if !json {
        match &verification.head {
            Some(head) => println!(
                "audit trail intact: {} entries; head {}:{} (keep it elsewhere and check later with `audit verify --pin`)",
                verification.entries, head.seq, head.hash
            ),
            None => println!("audit trail intact: no entries yet"),
        }
    }
    Ok(())
}

/// The defaults, with what the flags override.
fn limits(
    per_address: Option<usize>,
    pending_logins: Option<usize>,
    header_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
) -> Result<Limits> {
    let mut limits = Limits::default();
    if let Some(n) = per_address {
        if n == 0 {
            bail!("--max-connections-per-address must be at least 1");
        }
        limits.connections_per_address = n;
    }
    if let Some(n) = pending_logins {
        limits.pending_logins = n;
    }
    for (flag, value, field) in [
        (
            "--http-header-timeout",
            header_timeout,
            &mut limits.http_header_timeout,
        ),
        (
            "--http-idle-timeout",
            idle_timeout,
            &mut limits.http_idle_timeout,
        ),
    ] {
        if let Some(value) = value {
            if value.is_zero() {
                bail!("{flag} must be more than zero");
            }
            *field = value;
        }
    }
    Ok(limits)
}

async fn serve(options: ServeOptions) -> Result<()> {
    init_logging();
    let coordinator = Coordinator::start(options).await?;
    wait_for_signal().await?;
    tracing::info!("shutting down");
    coordinator.shutdown().await;
    Ok(())
}

async fn set_policy(data_dir: &Path, file: &Path, force: bool) -> Result<()> {
    let source = std::fs::read(file)
        .with_context(|| format!("cannot read policy file {}", file.display()))?;
    let Ok(source) = String::from_utf8(source) else {
        bail!("policy file {} is not UTF-8 text", file.display());
    };
    let installed = AdminClient::new(data_dir)
        .set_policy(&file.display().to_string(), &source, force)
        .await?;
    for warning in &installed.warnings {
        eprintln!("{warning}");
    }
    println!(
        "policy from {} installed ({} test checks passed)",
        file.display(),
        installed.tests_passed
    );
    Ok(())
}

fn print_table(nodes: &[NodeView]) {
    let rows = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.to_string(),
                n.name.clone(),
                n.ipv4.to_string(),
                n.ipv6.to_string(),
                n.identity.to_string(),
                if n.online { "online" } else { "offline" }.to_owned(),
                n.endpoints
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    print_rows(
        &[
            "ID",
            "NAME",
            "IPV4",
            "IPV6",
            "IDENTITY",
            "STATUS",
            "ENDPOINTS",
        ],
        rows,
    );
}

/// Prints `rows` under `header` in left-aligned columns.
fn print_rows(header: &[&str], rows: Vec<Vec<String>>) {
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot handle Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// Serves `/metrics` on `addr` for as long as the process runs.
async fn serve_metrics(addr: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (check --metrics-listen)"))?;
    tracing::info!(%addr, "metrics listening");
    tokio::spawn(weft_net::metrics_http::serve(listener, || async {
        weft_coordinator::metrics::render()
    }));
    Ok(())
}
