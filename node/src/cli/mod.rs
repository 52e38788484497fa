//! The `weft` command line: drives weftd over its local API, and checks
//! policy files offline.
#![allow(
    rustdoc::broken_intra_doc_links,
    reason = "the argument docs are --help text, where [IPv6]:PORT is literal"
)]

mod paths;
mod policy;
mod render;
mod whois;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use weft_proto::{AuthKey, PublicKey};

use crate::api::{ApiClient, LoginRequest, RunState, UpReply, UpRequest};
use weft_engine::coordinators::{CoordinatorAddress, Coordinators};

/// How often `weft up` checks whether a pending login completed.
const LOGIN_POLL: Duration = Duration::from_millis(200);

/// Where weftd listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/weft/weftd.sock";

/// Control the weft node daemon (weftd) and check access policies.
#[derive(Debug, Parser)]
#[command(name = "weft", version)]
pub struct Cli {
    /// The weftd API socket.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Join an overlay (or rejoin it) and wait until connected.
    Up(UpArgs),
    /// Log in again (after the device's login expired), keeping the node's addresses.
    Login {
        /// Use the device-code flow instead of a browser link.
        #[arg(long)]
        device_code: bool,
    },
    /// Disconnect from the overlay and remove the overlay addresses.
    Down,
    /// Show this node, the coordinator connection and the peers' tunnels,
    /// with the path each peer is reached by (direct or through a relay).
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show who owns an overlay address and the capabilities the policy
    /// grants them on this node (for applications authorizing a connection).
    Whois {
        /// The peer's overlay address: IP, IP:PORT or [IPv6]:PORT.
        address: String,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ping a peer and show the path each answer took.
    ///
    /// The probes are weftd's own path probes (not ICMP, so the peer's
    /// policy does not matter): each answer says whether it came directly
    /// from an underlay endpoint or through a relay, and its round-trip
    /// time. Exits 1 when no probe was answered.
    Ping {
        /// The peer: its name or one of its overlay addresses.
        peer: String,
        /// How many probes to send, one a second; each waits up to 2 s for its pong.
        #[arg(short = 'c', long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
        /// Print one JSON object per probe.
        #[arg(long)]
        json: bool,
    },
    /// Show what this node found out about its network and the relays.
    ///
    /// Whether UDP gets out, how the NAT in front of the node maps the
    /// WireGuard port, the endpoints the relays' STUN servers saw, the
    /// host's own endpoints, and each relay's transport (quic, tcp or down)
    /// and latency, the home relay marked.
    Netcheck {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Work with policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

/// Arguments of `weft up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// The coordinator's control address. Repeat the option, or separate
    /// addresses with commas, to name several replicas: weftd tries them in
    /// order (every address a name resolves to), stays with the first that
    /// answers, and moves to the next within seconds when that one fails.
    #[arg(long, value_name = "HOST:PORT", required = true, value_delimiter = ',')]
    pub coordinator: Vec<CoordinatorAddress>,
    /// The coordinator's public key, as `weft-coordinator key` prints it.
    #[arg(long, value_name = "KEY")]
    pub coordinator_key: PublicKey,
    /// A pre-auth key, or `file:PATH` to read it from a file. Only needed the
    /// first time this machine joins.
    #[arg(long, value_name = "KEY", env = "WEFT_AUTH_KEY", hide_env_values = true, value_parser = parse_auth_key)]
    pub auth_key: Option<AuthKey>,
    /// The name to ask for (default: the host's name).
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Without an auth key, log in with the device-code flow instead of a browser link.
    #[arg(long, conflicts_with_all = ["auth_key", "identity_token_file"])]
    pub device_code: bool,
    /// Join as a workload with the identity token the platform keeps in
    /// this file (a Kubernetes projected service-account token, a CI job's
    /// OIDC token); weftd re-reads it to renew the identity and rotate the
    /// node key. The token itself never passes through this command.
    #[arg(long, value_name = "PATH", conflicts_with = "auth_key")]
    pub identity_token_file: Option<PathBuf>,
}

/// `weft policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file and run its tests; exits 1 on any error. Needs no daemon.
    Check {
        /// The policy file.
        file: PathBuf,
        #[command(flatten)]
        roles: policy::RolesArg,
        /// Evaluate the tests that need devices (overlay addresses, role
        /// autogroups) against this device list: the JSON of
        /// `weft-coordinator nodes list --json`. Without it they are
        /// reported as not evaluated.
        #[arg(long, value_name = "FILE")]
        devices: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Explain what a policy file does with one flow: accept, deny or
    /// audit-deny, and the deciding rules. Needs no daemon.
    Explain {
        /// The policy file.
        file: PathBuf,
        /// The source: a user login, group:idp:NAME, tag:NAME, SPIFFE ID, host name or IP.
        #[arg(long, value_name = "SRC")]
        src: String,
        /// The destination and port: DST:PORT, e.g. tag:db:5432 or [fd7a::1]:443.
        #[arg(long, value_name = "DST:PORT")]
        dst: String,
        /// The protocol.
        #[arg(long, value_enum, default_value_t = policy::ProtoArg::Tcp)]
        proto: policy::ProtoArg,
        #[command(flatten)]
        roles: policy::RolesArg,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the flows between identities that NEW allows or denies and OLD
    /// did not, for reviewing a policy change. Needs no daemon.
    Diff {
        /// The policy in force.
        old: PathBuf,
        /// The proposed policy.
        new: PathBuf,
        #[command(flatten)]
        roles: policy::RolesArg,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let client = ApiClient::new(&cli.socket);
    match cli.command {
        Command::Up(args) => {
            let request = UpRequest {
                coordinator: Coordinators::new(args.coordinator)?,
                coordinator_key: args.coordinator_key,
                auth_key: args.auth_key,
                hostname: args.hostname,
                device_code: args.device_code,
                identity_token_file: args
                    .identity_token_file
                    .map(|path| std::path::absolute(&path).unwrap_or(path)),
            };
            let reply = client.up(&request).await?;
            finish_up(&client, reply).await?;
        }
        Command::Login { device_code } => {
            let reply = client.login(&LoginRequest { device_code }).await?;
            finish_up(&client, reply).await?;
        }
        Command::Down => {
            client.down().await?;
            println!("disconnected");
        }
        Command::Status { json } => {
            let status = client.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render::status(&status, std::time::SystemTime::now()));
            }
        }
        Command::Whois { address, json } => whois::run(&client, &address, json).await?,
        Command::Ping { peer, count, json } => {
            return paths::ping(&client, &peer, count, json).await
        }
        Command::Netcheck { json } => return paths::netcheck(&client, json).await,
        Command::Policy(PolicyCommand::Check {
            file,
            roles,
            devices,
            json,
        }) => return policy::check(&file, &roles, devices.as_deref(), json),
        Command::Policy(PolicyCommand::Explain {
            file,
            src,
            dst,
            proto,
            roles,
            json,
        }) => return policy::explain(&file, &src, &dst, proto, &roles, json),
        Command::Policy(PolicyCommand::Diff {
            old,
            new,
            roles,
            json,
        }) => return policy::diff(&old, &new, &roles, json),
    }
    Ok(ExitCode::SUCCESS)
}

/// Makes output piped into `head` end the way it does for any Unix tool,
/// quietly, rather than with a panic in `println!`: Rust's runtime ignores
/// SIGPIPE, and this restores the default. Only for command-line tools;
/// servers keep ignoring it and handle EPIPE on their sockets.
pub fn exit_quietly_on_broken_pipe() {
    // SAFETY: called first thing in `main`; setting a signal's action to
    // its default installs no handler code and races with nothing.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Prints the login URL when a person must log in and follows the daemon's
/// status until they did (or the login failed or expired).
async fn finish_up(client: &ApiClient, reply: UpReply) -> anyhow::Result<()> {
    let pending = match reply {
        UpReply::Running(me) => {
            println!("{}", render::connected(&me));
            return Ok(());
        }
        UpReply::LoginRequired(pending) => pending,
    };
    match &pending.user_code {
        Some(code) => println!(
            "To log in, visit: {} and enter code: {code}",
            pending.login_url
        ),
        None => println!("To log in, visit: {}", pending.login_url),
    }
    let deadline = Instant::now() + Duration::from_secs(pending.expires_in_secs);
    while Instant::now() < deadline {
        tokio::time::sleep(LOGIN_POLL).await;
        let status = client.status().await?;
        match status.state {
            RunState::Running => {
                if let Some(me) = &status.self_node {
                    println!("{}", render::connected(me));
                    return Ok(());
                }
            }
            RunState::NeedsLogin | RunState::Connecting
                if status.login_url.is_some() || status.message.is_none() => {}
            RunState::Connecting => {}
            _ => {
                let why = status.message.unwrap_or_else(|| "no reason given".into());
                anyhow::bail!("login did not complete: {why}");
            }
        }
    }
    anyhow::bail!("the login link expired before anyone logged in; run `weft login` for a new one")
}

/// Takes an auth key as given, or from a file with `file:PATH`, so it need
/// not appear in the process list.
fn parse_auth_key(value: &str) -> Result<AuthKey, String> {
    let key = match value.strip_prefix("file:") {
        Some(path) => read_key_file(Path::new(path)).map_err(|e| format!("{e:#}"))?,
        None => value.trim().to_owned(),
    };
    if key.is_empty() {
        return Err(
            "the auth key is empty; pass the key printed by `weft-coordinator authkey create`"
                .into(),
        );
    }
    Ok(AuthKey::new(key))
}

fn read_key_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the auth key file {}", path.display()))?;
    Ok(text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn up_parses_its_flags_and_defaults_the_socket() {
        let cli = Cli::try_parse_from([
            "weft",
            "up",
            "--coordinator",
            "198.51.100.1:7443",
            "--coordinator-key",
            KEY,
            "--auth-key",
            "weft-auth-0123456789ab-secret",
            "--hostname",
            "web-1",
        ])
        .unwrap();
        assert_eq!(cli.socket, Path::new(DEFAULT_SOCKET));
        let Command::Up(up) = cli.command else {
            panic!("not up: {:?}", cli.command)
        };
        assert_eq!(
            Coordinators::new(up.coordinator).unwrap().to_string(),
            "198.51.100.1:7443"
        );
        assert_eq!(up.coordinator_key.to_string(), KEY);
        assert_eq!(
            up.auth_key.unwrap().expose_secret(),
            "weft-auth-0123456789ab-secret"
        );
        assert_eq!(up.hostname.as_deref(), Some("web-1"));
    }

    #[test]
    fn several_coordinators_are_kept_in_order() {
        let cli = Cli::try_parse_from([
            "weft",
            "up",
            "--coordinator",
            "198.51.100.1:7443,198.51.100.2:7443",
            "--coordinator-key",
            KEY,
            "--coordinator",
            "coord.example:7443",
        ])
        .unwrap();
        let Command::Up(up) = cli.command else {
            panic!("not up: {:?}", cli.command)
        };
        assert_eq!(
            Coordinators::new(up.coordinator).unwrap().to_string(),
            "198.51.100.1:7443,198.51.100.2:7443,coord.example:7443"
        );
        let err = Cli::try_parse_from([
            "weft",
            "up",
            "--coordinator",
            "198.51.100.1",
            "--coordinator-key",
            KEY,
        ])
        .unwrap_err();
        assert!(err.to_string().contains("HOST:PORT"), "{err}");
    }

    #[test]
    fn a_bad_coordinator_key_is_rejected_with_the_expected_form() {
        let err = Cli::try_parse_from([
            "weft",
            "up",
            "--coordinator",
            "h:1",
            "--coordinator-key",
            "nope",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("44 characters"), "{err}");
    }

    #[test]
    fn the_auth_key_can_come_from_a_file_and_is_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "weft-auth-0123456789ab-fromfile\n").unwrap();
        let arg = format!("file:{}", path.display());
        let cli = Cli::try_parse_from([
            "weft",
            "--socket",
            "/tmp/s",
            "up",
            "--coordinator",
            "h:1",
            "--coordinator-key",
            KEY,
            "--auth-key",
            &arg,
        ])
        .unwrap();
        assert_eq!(cli.socket, Path::new("/tmp/s"));
        assert!(!format!("{cli:?}").contains("fromfile"));
        let Command::Up(up) = cli.command else {
            panic!("not up")
        };
        assert_eq!(
            up.auth_key.unwrap().expose_secret(),
            "weft-auth-0123456789ab-fromfile"
        );

        let err = parse_auth_key("file:/nonexistent/weft-key").unwrap_err();
        assert!(err.contains("/nonexistent/weft-key"), "{err}");
        assert!(parse_auth_key("  ").is_err());
    }

    #[test]
    fn status_policy_and_global_socket_parse() {
        let cli = Cli::try_parse_from(["weft", "status", "--json", "--socket", "/x"]).unwrap();
        assert!(matches!(cli.command, Command::Status { json: true }));
        assert_eq!(cli.socket, Path::new("/x"));
        let cli = Cli::try_parse_from(["weft", "policy", "check", "p.hujson"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Policy(PolicyCommand::Check { ref file, json: false, .. }) if file == Path::new("p.hujson")
        ));
        assert!(Cli::try_parse_from(["weft", "up"]).is_err());
        let cli = Cli::try_parse_from(["weft", "ping", "web-1", "-c", "2", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Ping { ref peer, count: 2, json: true } if peer == "web-1"
        ));
        let cli = Cli::try_parse_from(["weft", "ping", "100.64.0.2"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Ping {
                count: 4,
                json: false,
                ..
            }
        ));
        assert!(Cli::try_parse_from(["weft", "ping", "web-1", "-c", "0"]).is_err());
        assert!(Cli::try_parse_from(["weft", "ping"]).is_err());
        let cli = Cli::try_parse_from(["weft", "netcheck", "--json"]).unwrap();
        assert!(matches!(cli.command, Command::Netcheck { json: true }));
        assert!(Cli::try_parse_from(["weft", "frobnicate"]).is_err());
    }
}
