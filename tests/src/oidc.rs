//! A real OpenID provider for the end-to-end tests, and a browser stand-in
//! that logs people in over plain HTTP.
//!
//! [`TestIdp`] runs panva's `oidc-provider` (`tests/oidc/provider.js`, installed
//! by `tests/run` with `npm ci`) on loopback inside a namespace. [`Browser`]
//! follows a login link through the coordinator and the provider back to the
//! coordinator's callback, keeping each site's cookies, as a browser would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::netns::in_netns;
use crate::probe::wait_until;
use crate::process::Process;

/// A running `oidc-provider`; stopped on drop.
#[derive(Debug)]
pub struct TestIdp {
    process: Option<Process>,
    netns: String,
    port: u16,
    users_file: PathBuf,
    clients: String,
    log: PathBuf,
}

impl TestIdp {
    /// Starts the provider on `127.0.0.1:port` in namespace `netns`, with
    /// `clients` (`(id, secret, redirect_uri)`) and the users in `users`
    /// (`{"NAME": {"email": …, "groups": […]}}`, re-read at every login).
    pub fn start(
        netns: &str,
        port: u16,
        clients: &[(&str, &str, &str)],
        users: &serde_json::Value,
        dir: &Path,
    ) -> Result<Self> {
        let users_file = dir.join("idp-users.json");
        std::fs::write(&users_file, users.to_string())?;
        let clients: Vec<serde_json::Value> = clients
            .iter()
            .map(|(id, secret, redirect)| {
                serde_json::json!({"id": id, "secret": secret, "redirect_uri": redirect})
            })
            .collect();
        let mut idp = Self {
            process: None,
            netns: netns.to_owned(),
            port,
            users_file,
            clients: serde_json::Value::from(clients).to_string(),
            log: dir.join("idp.log"),
        };
        idp.resume()?;
        Ok(idp)
    }

    /// The issuer URL.
    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Replaces the users (e.g. to change someone's groups).
    pub fn set_users(&self, users: &serde_json::Value) -> Result<()> {
        std::fs::write(&self.users_file, users.to_string())?;
        Ok(())
    }

    /// Stops the provider, as in an outage.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
    }

    /// Starts the provider again after [`TestIdp::stop`].
    pub fn resume(&mut self) -> Result<()> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc/provider.js");
        if !Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("oidc/node_modules/oidc-provider")
            .exists()
        {
            bail!("oidc-provider is not installed: run `npm ci` in tests/oidc (tests/run does)");
        }
        let port = self.port.to_string();
        let script = script.to_string_lossy().into_owned();
        let process = Process::spawn(
            "oidc-provider",
            &self.netns,
            Path::new("node"),
            &[&script],
            self.log.clone(),
            &[
                ("WEFT_OIDC_PORT", &port),
                ("WEFT_OIDC_CLIENTS", &self.clients),
                ("WEFT_OIDC_USERS", &self.users_file.to_string_lossy()),
            ],
        )?;
        self.process = Some(process);
        let discovery = format!("{}/.well-known/openid-configuration", self.issuer());
        let netns = self.netns.clone();
        let up = wait_until(Duration::from_secs(20), || {
            let url = discovery.clone();
            in_netns(&netns, move || ureq::get(&url).call().is_ok()).unwrap_or(false)
        });
        if up.is_none() {
            bail!(
                "oidc-provider did not come up:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// The provider's output.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// What the coordinator's callback answered.
#[derive(Debug, Clone)]
pub struct Page {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: String,
    /// The URL that answered.
    pub url: String,
}

/// Follows login links like a browser, inside one namespace, keeping cookies per site.
#[derive(Debug)]
pub struct Browser {
    netns: String,
    cookies: BTreeMap<String, BTreeMap<String, String>>,
}

impl Browser {
    /// A browser in namespace `netns` with no cookies.
    pub fn new(netns: &str) -> Self {
        Self {
            netns: netns.to_owned(),
            cookies: BTreeMap::new(),
        }
    }

    /// Opens `url`, logs in as `user` when the provider asks, and follows
    /// redirects until a page answers: the coordinator's callback page, or
    /// an error page on the way.
    pub fn login(&mut self, url: &str, user: &str) -> Result<Page> {
        let mut url = url::Url::parse(url).context("login URL")?;
        let started = Instant::now();
        for _ in 0..16 {
            if url.path().starts_with("/interaction/") && url.query().is_none() {
                url.query_pairs_mut().append_pair("user", user);
            }
            let (status, location, body) = self.get(&url)?;
            match location {
                Some(next) if (300..400).contains(&status) => {
                    url = url.join(&next).context("redirect location")?;
                }
                _ => {
                    return Ok(Page {
                        status,
                        body,
                        url: url.to_string(),
                    })
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                break;
            }
        }
        bail!("the login did not settle on a page (last URL {url})")
    }

    /// One GET with this site's cookies; records the cookies it sets.
    /// The status, the `Location` header and the body.
    pub fn get(&mut self, url: &url::Url) -> Result<(u16, Option<String>, String)> {
        let site = format!(
            "{}:{}",
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or_default()
        );
        let cookie = self
            .cookies
            .get(&site)
            .map(|jar| {
                jar.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default();
        let target = url.to_string();
        let answer = in_netns(
            &self.netns,
            move || -> Result<(u16, Option<String>, Vec<String>, String)> {
                let agent = ureq::AgentBuilder::new()
                    .redirects(0)
                    .timeout(Duration::from_secs(15))
                    .build();
                let mut request = agent.get(&target);
                if !cookie.is_empty() {
                    request = request.set("Cookie", &cookie);
                }
                let response = match request.call() {
                    Ok(response) => response,
                    Err(ureq::Error::Status(_, response)) => response,
                    Err(e) => bail!("GET {target}: {e}"),
                };
                let status = response.status();
                let location = response.header("location").map(str::to_owned);
                let set: Vec<String> = response
                    .all("set-cookie")
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect();
                let body = response.into_string().unwrap_or_default();
                Ok((status, location, set, body))
            },
        )??;
        let (status, location, set, body) = answer;
        let jar = self.cookies.entry(site).or_default();
        for line in set {
            if let Some((name, value)) = line.split(';').next().and_then(|c| c.split_once('=')) {
                jar.insert(name.trim().to_owned(), value.trim().to_owned());
            }
        }
        Ok((status, location, body))
    }
}
