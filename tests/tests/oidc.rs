//! Human SSO end to end: a real OpenID provider (panva's `oidc-provider`),
//! the coordinator as its relying party, and laptops that join the overlay
//! as the person who logged in — with IdP groups in policy, the device
//! authorization grant (`weft up --device-code`), login expiry, `weft login`,
//! disabled users and an identity-provider outage.

use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use serde_json::json;
use weft_tests::{in_netns, tcp_echo, wait_until, Browser, EchoServer, Lab, Overlay, TestIdp};

const IDP_PORT: u16 = 9400;
const CLIENT_ID: &str = "weft";
const CLIENT_SECRET: &str = "weft-test-client-secret";
const CUT_BUDGET: Duration = Duration::from_secs(5);
const ECHO_PORT: u16 = 7000;

fn users() -> serde_json::Value {
    json!({
        "alice": {"email": "alice@example.com", "groups": ["eng"]},
        "bob": {"email": "bob@example.com", "groups": ["sales"]},
        "eve": {"email": "eve@evil.test", "groups": ["eng"]},
    })
}

/// A `weft up` or `weft login` waiting for a person to log in.
struct Waiting {
    child: Child,
    rest: std::thread::JoinHandle<String>,
}

/// Reads `weft up`/`weft login` output up to the login URL line.
fn login_url(mut child: Child) -> Result<(String, Waiting)> {
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = match lines.next() {
        Some(line) => line.context("read weft's output")?,
        None => {
            let out = child.wait_with_output()?;
            anyhow::bail!(
                "weft printed no login URL: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    let url = line
        .strip_prefix("To log in, visit: ")
        .with_context(|| format!("expected the login URL line, got {line:?}"))?
        .to_owned();
    let rest =
        std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>().join("\n"));
    Ok((url, Waiting { child, rest }))
}

/// Enters `code` at the provider's verification page and logs in as `user`,
/// as a person would in a browser: the code form, the confirmation form,
/// then the provider's login. Returns the page the provider ends on.
fn confirm_device_code(
    netns: &str,
    verification_uri: &str,
    code: &str,
    user: &str,
) -> Result<String> {
    let (uri, code, user) = (
        verification_uri.to_owned(),
        code.to_owned(),
        user.to_owned(),
    );
    in_netns(netns, move || -> Result<String> {
        let mut jar = std::collections::BTreeMap::<String, String>::new();
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout(Duration::from_secs(15))
            .build();
        let mut send = |method: &str,
                        url: &str,
                        form: &[(&str, &str)]|
         -> Result<(u16, Option<String>, String)> {
            let cookies: Vec<String> = jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let request = agent
                .request(method, url)
                .set("Cookie", &cookies.join("; "));
            let response = match if form.is_empty() {
                request.call()
            } else {
                request.send_form(form)
            } {
                Ok(response) | Err(ureq::Error::Status(_, response)) => response,
                Err(e) => anyhow::bail!("{method} {url}: {e}"),
            };
            for line in response.all("set-cookie") {
                if let Some((name, value)) = line.split(';').next().and_then(|c| c.split_once('='))
                {
                    jar.insert(name.trim().to_owned(), value.trim().to_owned());
                }
            }
            let status = response.status();
            let location = response.header("location").map(str::to_owned);
            Ok((status, location, response.into_string().unwrap_or_default()))
        };
        let xsrf = |page: &str| -> Result<String> {
            let start = page
                .find(r#"name="xsrf" value=""#)
                .context("no xsrf field on the device page")?
                + 19;
            let len = page[start..].find('"').context("unterminated xsrf field")?;
            Ok(page[start..start + len].to_owned())
        };
        let (_, _, page) = send("GET", &uri, &[])?;
        let token = xsrf(&page).with_context(|| format!("code entry page: {page}"))?;
        let (_, _, page) = send("POST", &uri, &[("xsrf", &token), ("user_code", &code)])?;
        let token = xsrf(&page).with_context(|| format!("confirmation page: {page}"))?;
        let (mut status, mut location, mut page) = send(
            "POST",
            &uri,
            &[("xsrf", &token), ("user_code", &code), ("confirm", "yes")],
        )?;
        let mut url = url::Url::parse(&uri)?;
        for _ in 0..16 {
            let Some(next) = location.filter(|_| (300..400).contains(&status)) else {
                return Ok(page);
            };
            url = url.join(&next)?;
            if url.path().starts_with("/interaction/") && url.query().is_none() {
                url.query_pairs_mut().append_pair("user", &user);
            }
            (status, location, page) = send("GET", url.as_str(), &[])?;
        }
        anyhow::bail!("the device login did not settle on a page (last URL {url})")
    })?
}

fn finish(waiting: Waiting) -> Result<(bool, String)> {
    let out = waiting.child.wait_with_output()?;
    let mut text = waiting.rest.join().unwrap_or_default();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

fn reaches(overlay: &Overlay, from: &str, to: IpAddr) -> bool {
    let ns = overlay
        .node(from)
        .map(|n| n.host().netns.clone())
        .unwrap_or_default();
    tcp_echo(
        &ns,
        SocketAddr::new(to, ECHO_PORT),
        Duration::from_millis(800),
    )
    .is_ok()
}

#[test]
fn people_log_in_with_the_identity_provider() {
    weft_tests::require_root().expect("root");
    let mut lab = Lab::new().expect("create lab");
    for (name, octet) in [
        ("coord", 1),
        ("server", 20),
        ("laptop", 30),
        ("laptop2", 31),
        ("kiosk", 32),
    ] {
        lab.add_host(name, octet).expect("add host");
    }
    let mut overlay = Overlay::new(lab).expect("create overlay");
    let mut idp = None;
    if let Err(e) = scenario(&mut overlay, &mut idp) {
        let idp_log = idp.as_ref().map(TestIdp::log).unwrap_or_default();
        panic!(
            "{e:?}\n\n{}\n\n== oidc-provider ==\n{idp_log}",
            overlay.logs()
        );
    }
}

fn scenario(overlay: &mut Overlay, idp_slot: &mut Option<TestIdp>) -> Result<()> {
    let coord = overlay.lab().host("coord")?.clone();
    let dir: PathBuf = overlay.lab().host_dir("coord");
    std::fs::create_dir_all(&dir)?;
    let public_url = format!("http://{}:7443", coord.addr);
    let callback = format!("{public_url}/oidc/callback");
    *idp_slot = Some(TestIdp::start(
        &coord.netns,
        IDP_PORT,
        &[(CLIENT_ID, CLIENT_SECRET, &callback)],
        &users(),
        &dir,
    )?);
    let idp = idp_slot.as_mut().context("idp")?;
    let secret = dir.join("client-secret");
    std::fs::write(&secret, format!("{CLIENT_SECRET}\n"))?;
    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            r#"public_url = "{public_url}"

[oidc]
issuer = "{issuer}"
client_id = "{CLIENT_ID}"
client_secret_file = "{secret}"
scopes = ["openid", "email", "groups"]
allowed_domains = ["example.com"]
groups_claim = "groups"
key_expiry = "1h"
"#,
            issuer = idp.issuer(),
            secret = secret.display(),
        ),
    )?;
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc/policy.hujson");
    let config_arg = config.to_string_lossy().into_owned();
    overlay.start_coordinator_with("coord", &policy, &["--config", &config_arg])?;
    let (address, key) = {
        let c = overlay.coordinator()?;
        (c.address().to_owned(), c.public_key()?)
    };

    // A server joins with a tagged key and serves an echo port.
    let server_key = overlay.coordinator()?.authkey(&["tag:server"], false)?;
    overlay.start_node("server")?;
    let out = overlay
        .node("server")?
        .up(&address, &key, Some(&server_key), "server")?;
    ensure!(out.status.success(), "server up: {out:?}");
    let server_ns = overlay.node("server")?.host().netns.clone();
    let _echo = EchoServer::start(&server_ns, ECHO_PORT)?;
    let server_ip = overlay.node("server")?.overlay_ipv4()?;

    // Alice logs her laptop in; `weft up` prints the URL and waits.
    overlay.start_node("laptop")?;
    let up_args = [
        "up",
        "--coordinator",
        &address,
        "--coordinator-key",
        &key,
        "--hostname",
        "laptop",
    ];
    let (url, child) = login_url(overlay.node("laptop")?.weft_spawn(&up_args)?)?;
    // Whoever opens the link first chooses whose identity the node joins
    // as: it goes to the `weft up` that asked, and to root's status, never
    // into the status message that socket-group readers see, nor the log.
    let waiting = overlay.node("laptop")?.status()?;
    ensure!(
        waiting["login_url"] == url.as_str() && !waiting["message"].to_string().contains("/login/"),
        "status while a login waits: {waiting}"
    );
    ensure!(
        !overlay.node("laptop")?.log().contains("/login/"),
        "weftd logged the login link"
    );
    let mut browser = Browser::new(&coord.netns);
    let page = browser.login(&url, "alice")?;
    let logged_in = Instant::now();
    ensure!(
        page.status == 200
            && page.body.contains("connected")
            && page.body.contains("alice@example.com"),
        "callback page: {page:?}"
    );
    let (ok, text) = finish(child)?;
    ensure!(
        ok && text.contains("connected as laptop"),
        "weft up: {text}"
    );
    wait_until(Duration::from_secs(10), || {
        reaches(overlay, "laptop", server_ip)
    })
    .context("alice (group eng) never reached the server")?;
    weft_tests::record_metric(&format!(
        "oidc: browser login finished -> first packet through the tunnel: {} ms",
        logged_in.elapsed().as_millis()
    ));
    let laptop_ip = overlay.node("laptop")?.overlay_ipv4()?;
    let status = overlay.node("laptop")?.status()?;
    ensure!(
        status["self"]["identity"] == "alice@example.com",
        "identity: {status}"
    );

    // The login link and the callback are single-use.
    let replay = browser.get(&url::Url::parse(&page.url)?)?;
    ensure!(
        replay.0 == 400 && replay.2.contains("already used"),
        "replayed callback: {replay:?}"
    );
    let again = browser.get(&url::Url::parse(&url)?)?;
    ensure!(again.0 == 400, "reused login link: {again:?}");
    let forged = browser.get(&url::Url::parse(&format!(
        "{callback}?code=x&state=forged"
    ))?)?;
    ensure!(
        forged.0 == 400 && forged.2.contains("state"),
        "wrong state: {forged:?}"
    );

    // Eve's domain is not allowed; Bob is allowed but not in `eng`.
    overlay.start_node("laptop2")?;
    let up2 = [
        "up",
        "--coordinator",
        &address,
        "--coordinator-key",
        &key,
        "--hostname",
        "laptop2",
    ];
    let (url2, child) = login_url(overlay.node("laptop2")?.weft_spawn(&up2)?)?;
    let page = Browser::new(&coord.netns).login(&url2, "eve")?;
    ensure!(
        page.status == 403 && page.body.contains("allowed_domains"),
        "eve: {page:?}"
    );
    let (ok, text) = finish(child)?;
    ensure!(
        !ok && text.contains("allowed_domains"),
        "weft up for eve: {text}"
    );
    let (url2, child) = login_url(overlay.node("laptop2")?.weft_spawn(&up2)?)?;
    let page = Browser::new(&coord.netns).login(&url2, "bob")?;
    ensure!(page.status == 200, "bob: {page:?}");
    let (ok, text) = finish(child)?;
    ensure!(ok, "weft up for bob: {text}");
    ensure!(
        !reaches(overlay, "laptop2", server_ip),
        "bob (sales) must not reach the server"
    );

    // A machine without a browser logs in with the device-code flow: the
    // person enters the code at the provider from another device.
    overlay.start_node("kiosk")?;
    let kiosk_up = [
        "up",
        "--coordinator",
        &address,
        "--coordinator-key",
        &key,
        "--hostname",
        "kiosk",
        "--device-code",
    ];
    let (prompt, child) = login_url(overlay.node("kiosk")?.weft_spawn(&kiosk_up)?)?;
    let (verification_uri, user_code) = prompt
        .split_once(" and enter code: ")
        .with_context(|| format!("expected `URL and enter code: CODE`, got {prompt:?}"))?;
    ensure!(
        verification_uri.starts_with(&idp.issuer()),
        "the device flow must send the person to the provider: {verification_uri}"
    );
    let page = confirm_device_code(&coord.netns, verification_uri, user_code, "alice")?;
    ensure!(page.contains("Success"), "device confirmation: {page}");
    let (ok, text) = finish(child)?;
    ensure!(
        ok && text.contains("connected as kiosk"),
        "weft up --device-code: {text}"
    );
    let status = overlay.node("kiosk")?.status()?;
    ensure!(
        status["self"]["identity"] == "alice@example.com",
        "kiosk identity: {status}"
    );
    wait_until(Duration::from_secs(10), || {
        reaches(overlay, "kiosk", server_ip)
    })
    .context("the device-code login (alice, group eng) never reached the server")?;

    // An administrator expires the laptop: the server drops it within 5 s.
    overlay
        .coordinator()?
        .admin(&["nodes", "expire", "laptop"])?;
    let cut = wait_until(CUT_BUDGET, || {
        !overlay
            .node("server")
            .and_then(|n| n.peer_names())
            .is_ok_and(|peers| peers.iter().any(|p| p == "laptop"))
    })
    .context("the server kept the expired laptop as a peer")?;
    weft_tests::record_metric(&format!(
        "oidc: nodes expire -> peer dropped: {} ms",
        cut.as_millis()
    ));
    ensure!(
        !reaches(overlay, "laptop", server_ip),
        "expired laptop still reaches the server"
    );
    let needs_login = wait_until(CUT_BUDGET, || {
        overlay
            .node("laptop")
            .and_then(|n| n.status())
            .is_ok_and(|s| {
                s["state"] == "needs-login"
                    && s["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("weft login"))
            })
    });
    ensure!(
        needs_login.is_some(),
        "laptop status: {}",
        overlay.node("laptop")?.status()?
    );

    // `weft login` restores it with the same address.
    let (url, child) = login_url(overlay.node("laptop")?.weft_spawn(&["login"])?)?;
    let page = Browser::new(&coord.netns).login(&url, "alice")?;
    ensure!(page.status == 200, "re-login: {page:?}");
    let (ok, text) = finish(child)?;
    ensure!(ok, "weft login: {text}");
    ensure!(
        overlay.node("laptop")?.overlay_ipv4()? == laptop_ip,
        "the address changed"
    );
    wait_until(Duration::from_secs(10), || {
        reaches(overlay, "laptop", server_ip)
    })
    .context("the laptop did not reach the server after `weft login`")?;

    // Disabling Alice cuts her laptop within 5 s, and she cannot log in again.
    overlay
        .coordinator()?
        .admin(&["users", "disable", "alice@example.com"])?;
    wait_until(CUT_BUDGET, || !reaches(overlay, "laptop", server_ip))
        .context("a disabled user's laptop still reaches the server")?;
    let (url, child) = login_url(overlay.node("laptop")?.weft_spawn(&["login"])?)?;
    let page = Browser::new(&coord.netns).login(&url, "alice")?;
    let (ok, text) = finish(child)?;
    ensure!(
        !ok && text.contains("disabled"),
        "disabled alice logged in: {page:?} {text}"
    );

    // The identity provider goes away: existing nodes keep working, logins
    // fail saying why, and come back with the provider.
    idp.stop();
    let out = overlay.node("laptop2")?.weft(&["login"])?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !out.status.success() && text.contains("unreachable"),
        "login during outage: {text}"
    );
    let status = overlay.node("server")?.status()?;
    ensure!(
        status["state"] == "running",
        "server during outage: {status}"
    );
    idp.resume()?;
    let (url, child) = login_url(overlay.node("laptop2")?.weft_spawn(&["login"])?)?;
    let page = Browser::new(&coord.netns).login(&url, "bob")?;
    ensure!(page.status == 200, "login after outage: {page:?}");
    let (ok, text) = finish(child)?;
    ensure!(ok, "weft login after outage: {text}");
    Ok(())
}
