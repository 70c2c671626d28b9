//! Where the Redis primary is: one address, or whatever Redis Sentinel says it is now.
//!
//! `redis+sentinel://[user:password@]host1:26379,host2:26379,host3:26379/<master name>[/<db>]`
//! names the sentinels and the monitored master; every connection this process opens (a
//! [`super::link::Link`] replacing a dead connection, a blocking reader, the completions
//! subscription) first asks the sentinels, in turn, for the master's current address
//! (`SENTINEL get-master-addr-by-name`) and checks with `ROLE` that the server found is a primary
//! (a sentinel that has not yet seen a failover can name the old one). A connection to a primary
//! that was demoted answers writes with `READONLY`, which [`super::link::is_dead`] treats like a
//! dead connection, so the next call reconnects to the new primary. The credentials in the URL
//! are the primary's; the sentinels are asked without them.
//!
//! `rediss+sentinel://…` speaks TLS to the sentinels and to the primary alike (Redis's
//! `tls-port` on both, `tls-replication yes`), trusting `queue.redis_ca_cert` when set: each
//! certificate must name the host as the sentinels announce it (`announce-hostnames`), since a
//! primary is reached by the name a sentinel gives.

use redis::{Client, RedisError, Value};

use super::link::CONNECT_TIMEOUT;

/// The scheme of a sentinel URL.
pub const SENTINEL_SCHEME: &str = "redis+sentinel://";
/// The same over TLS.
pub const SENTINEL_TLS_SCHEME: &str = "rediss+sentinel://";

/// Whether `url` names sentinels (with or without TLS).
pub fn is_sentinel_url(url: &str) -> bool {
    url.starts_with(SENTINEL_SCHEME) || url.starts_with(SENTINEL_TLS_SCHEME)
}

/// How to reach the primary.
pub(super) enum Endpoint {
    Direct(Client),
    Sentinel(Sentinels),
}

pub(super) struct Sentinels {
    addresses: Vec<String>,
    /// The sentinel that answered last: asked first next time, so a dead one costs its
    /// timeout once, not on every reconnect.
    last_good: std::sync::atomic::AtomicUsize,
    master: String,
    /// `user:password@` (or `:password@`) for the primary, empty without credentials.
    auth: String,
    db: u32,
    /// `Some(ca)` over TLS (`rediss+sentinel://`), trusting `ca` alone when given.
    tls: Option<Option<std::path::PathBuf>>,
}

fn invalid(reason: String) -> RedisError {
    RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "bad sentinel URL",
        reason,
    ))
}

/// Parse `redis[s]+sentinel://[auth@]host:port,host:port/master[/db]`; `ca_cert` is trusted
/// for TLS (`rediss+sentinel://` only).
pub(super) fn parse_sentinels(
    url: &str,
    ca_cert: Option<&std::path::Path>,
) -> Result<Sentinels, RedisError> {
    let (rest, tls) = match url.strip_prefix(SENTINEL_TLS_SCHEME) {
        Some(rest) => (rest, Some(ca_cert.map(std::path::Path::to_path_buf))),
        None => (
            url.strip_prefix(SENTINEL_SCHEME).ok_or_else(|| {
                invalid(format!(
                    "{SENTINEL_SCHEME} or {SENTINEL_TLS_SCHEME} expected"
                ))
            })?,
            None,
        ),
    };
    if tls.is_none() && ca_cert.is_some() {
        return Err(invalid(format!(
            "a CA certificate is only used with TLS: {SENTINEL_TLS_SCHEME}"
        )));
    }
    // Credentials first (up to the last `@`), so that a `/` in a password is never taken for
    // the path and no part of it reaches an error message.
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (format!("{auth}@"), rest),
        None => (String::new(), rest),
    };
    let (hosts, path) = rest.split_once('/').ok_or_else(|| {
        invalid("no master name: redis+sentinel://host:port,.../<master name>".into())
    })?;
    let addresses: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| {
            if h.rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            {
                Ok(h.to_string())
            } else {
                Err(invalid(format!("sentinel address `{h}` is not host:port")))
            }
        })
        .collect::<Result<_, _>>()?;
    if addresses.is_empty() {
        return Err(invalid("no sentinel address".into()));
    }
    let mut parts = path.split('/');
    let master = parts.next().unwrap_or_default().to_string();
    if master.is_empty() {
        return Err(invalid("empty master name".into()));
    }
    let db = match parts.next() {
        None | Some("") => 0,
        Some(d) => d
            .parse()
            .map_err(|_| invalid(format!("database `{d}` is not a number")))?,
    };
    Ok(Sentinels {
        addresses,
        last_good: Default::default(),
        master,
        auth,
        db,
        tls,
    })
}

impl Endpoint {
    /// A client for the primary as it is now.
    pub(super) async fn client(&self) -> Result<Client, RedisError> {
        match self {
            Endpoint::Direct(c) => Ok(c.clone()),
            Endpoint::Sentinel(s) => s.primary().await,
        }
    }
}

/// One command on a fresh connection to `client`, within the connect timeout (twice: connect,
/// then answer).
async fn ask(client: &Client, cmd: &redis::Cmd) -> Result<Value, RedisError> {
    let timed_out = || {
        RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer in time",
        ))
    };
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| timed_out())??;
    tokio::time::timeout(CONNECT_TIMEOUT, cmd.query_async(&mut conn))
        .await
        .map_err(|_| timed_out())?
}

impl Sentinels {
    async fn primary(&self) -> Result<Client, RedisError> {
        use std::sync::atomic::Ordering;
        let mut last = None;
        let start = self.last_good.load(Ordering::Relaxed);
        let n = self.addresses.len();
        for i in (0..n).map(|k| (start + k) % n) {
            let sentinel = &self.addresses[i];
            match self.ask_sentinel(sentinel).await {
                Ok(client) => {
                    self.last_good.store(i, Ordering::Relaxed);
                    return Ok(client);
                }
                Err(e) => {
                    tracing::debug!(sentinel = %sentinel, error = %e, "sentinel gave no primary");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| invalid("no sentinel".into())))
    }

    /// A client for `host_port_db` (`host:port[/db]`, with credentials prefixed by the caller),
    /// over TLS when the URL asked for it.
    fn open(&self, rest: &str) -> Result<Client, RedisError> {
        match &self.tls {
            None => Client::open(format!("redis://{rest}")),
            Some(ca) => {
                super::open_client(&format!("rediss://{rest}"), ca.as_deref()).map_err(invalid)
            }
        }
    }

    async fn ask_sentinel(&self, sentinel: &str) -> Result<Client, RedisError> {
        let client = self.open(sentinel)?;
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg("get-master-addr-by-name").arg(&self.master);
        let addr: Option<(String, u16)> = redis::from_redis_value(ask(&client, &cmd).await?)?;
        let (host, port) = addr.ok_or_else(|| {
            invalid(format!(
                "sentinel {sentinel} monitors no master named `{}`",
                self.master
            ))
        })?;
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let primary = self.open(&format!("{}{host}:{port}/{}", self.auth, self.db))?;
        // A sentinel that has not seen a failover yet names the old primary: check its role.
        let role = ask(&primary, &redis::cmd("ROLE")).await?;
        let is_primary = matches!(&role, Value::Array(r) if matches!(
            r.first(),
            Some(Value::BulkString(b)) if b == b"master"
        ) || matches!(r.first(), Some(Value::SimpleString(s)) if s == "master"));
        if !is_primary {
            return Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("{host}:{port}, named by sentinel {sentinel}, is not a primary (yet)"),
            )));
        }
        Ok(primary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse_and_bad_ones_say_why() {
        let s = parse_sentinels("redis+sentinel://a:26379, b:26380,c:1/mymaster/2", None).unwrap();
        assert_eq!(s.addresses, ["a:26379", "b:26380", "c:1"]);
        assert_eq!(
            (s.master.as_str(), s.db, s.auth.as_str()),
            ("mymaster", 2, "")
        );
        let s = parse_sentinels("redis+sentinel://:secret@a:26379/m", None).unwrap();
        assert_eq!((s.auth.as_str(), s.db), (":secret@", 0));
        // A `/` in the password stays in the password, out of every error message.
        let s = parse_sentinels("redis+sentinel://u:se/cr3t@a:26379/m", None).unwrap();
        assert_eq!((s.auth.as_str(), s.master.as_str()), ("u:se/cr3t@", "m"));
        let e = parse_sentinels("redis+sentinel://u:se/cr3t@a/m", None)
            .err()
            .unwrap()
            .to_string();
        assert!(!e.contains("cr3t"), "{e}");
        for (url, why) in [
            ("redis+sentinel://a:26379", "no master name"),
            ("redis+sentinel://a:26379/", "empty master name"),
            ("redis+sentinel:///m", "no sentinel address"),
            ("redis+sentinel://a/m", "not host:port"),
            ("redis+sentinel://a:1/m/x", "not a number"),
            ("redis://a:1/m", "rediss+sentinel:// expected"),
        ] {
            let e = parse_sentinels(url, None).err().unwrap().to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
        // TLS: the same form, and a CA only with it.
        let ca = std::path::Path::new("/etc/ca.pem");
        let s = parse_sentinels("rediss+sentinel://a:26379,b:1/m", Some(ca)).unwrap();
        assert_eq!(s.tls, Some(Some(ca.to_path_buf())));
        assert_eq!(s.addresses, ["a:26379", "b:1"]);
        let e = parse_sentinels("redis+sentinel://a:26379/m", Some(ca))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("only used with TLS"), "{e}");
    }
}
