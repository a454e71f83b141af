//! The Redis store: the production store, shared by any number of stateless listeners.
//!
//! Key layout, value formats and which script touches which key: `schemas/redis-keys.md`
//! ([`keys`] builds every key). Every mutating operation is ONE Lua script
//! (`scripts/<flow>/*.lua`), run with EVALSHA (the `redis` crate reloads a script after
//! NOSCRIPT), so two listeners racing for one passphrase get exactly one winner. Every
//! script declares all its keys, and they share one cluster slot: each begins with the
//! `#!lua` line, under which Redis refuses a script that strays across slots. Reads are
//! plain commands, pipelined.
//!
//! Scripts never compute timestamps or format numbers: `now_ms` and every stored number
//! arrive as decimal argument strings and are stored verbatim.

mod ijam;
pub mod keys;
pub mod portal;
mod pubkey;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, Script};

use super::{StoreError, Stores};

/// How long one command may wait for its reply before the store reports `Unavailable`.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a connection may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a request may spend finding out whether an operation it sent took effect
/// (after a lost connection or a reply that never came), re-running it until Redis
/// answers.
pub const SETTLE_WITHIN: Duration = Duration::from_secs(10);

/// Pause between two re-runs while the outcome is unknown.
const SETTLE_RETRY: Duration = Duration::from_millis(100);

/// Error code a script raises (`redis.error_reply('RGCORRUPT …')`) for unreadable data.
const CORRUPT_CODE: &str = "RGCORRUPT";

/// Every script, loaded once per store.
struct Scripts {
    create_network: Script,
    set_reregistration: Script,
    delete_network: Script,
    import_node: Script,
    add_passphrases: Script,
    revoke_passphrase: Script,
    register: Script,
    transition: Script,
    revoke_node: Script,
    replace_sealed_key: Script,
    register_device: Script,
    attest_device: Script,
    revoke_device: Script,
}

/// The source of every script, by path: the store loads them, and the tests check
/// each declares its keys and keeps to one slot.
pub const SCRIPTS: &[(&str, &str)] = &[
    (
        "ijam/create_network.lua",
        include_str!("scripts/ijam/create_network.lua"),
    ),
    (
        "ijam/set_reregistration.lua",
        include_str!("scripts/ijam/set_reregistration.lua"),
    ),
    (
        "ijam/delete_network.lua",
        include_str!("scripts/ijam/delete_network.lua"),
    ),
    (
        "ijam/import_node.lua",
        include_str!("scripts/ijam/import_node.lua"),
    ),
    (
        "ijam/add_passphrases.lua",
        include_str!("scripts/ijam/add_passphrases.lua"),
    ),
    (
        "ijam/revoke_passphrase.lua",
        include_str!("scripts/ijam/revoke_passphrase.lua"),
    ),
    (
        "ijam/register.lua",
        include_str!("scripts/ijam/register.lua"),
    ),
    (
        "ijam/transition.lua",
        include_str!("scripts/ijam/transition.lua"),
    ),
    (
        "ijam/revoke_node.lua",
        include_str!("scripts/ijam/revoke_node.lua"),
    ),
    (
        "ijam/replace_sealed_key.lua",
        include_str!("scripts/ijam/replace_sealed_key.lua"),
    ),
    (
        "portal/create_network.lua",
        include_str!("scripts/portal/create_network.lua"),
    ),
    (
        "portal/delete_network.lua",
        include_str!("scripts/portal/delete_network.lua"),
    ),
    (
        "portal/add_passphrases.lua",
        include_str!("scripts/portal/add_passphrases.lua"),
    ),
    (
        "portal/revoke_passphrase.lua",
        include_str!("scripts/portal/revoke_passphrase.lua"),
    ),
    (
        "portal/register.lua",
        include_str!("scripts/portal/register.lua"),
    ),
    (
        "portal/transition.lua",
        include_str!("scripts/portal/transition.lua"),
    ),
    (
        "portal/revoke_node.lua",
        include_str!("scripts/portal/revoke_node.lua"),
    ),
    (
        "pubkey/register_device.lua",
        include_str!("scripts/pubkey/register_device.lua"),
    ),
    (
        "pubkey/attest_device.lua",
        include_str!("scripts/pubkey/attest_device.lua"),
    ),
    (
        "pubkey/revoke_device.lua",
        include_str!("scripts/pubkey/revoke_device.lua"),
    ),
];

fn script(path: &str) -> Script {
    let (_, source) = SCRIPTS
        .iter()
        .find(|(p, _)| *p == path)
        .unwrap_or_else(|| panic!("no script {path}"));
    Script::new(source)
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            create_network: script("ijam/create_network.lua"),
            set_reregistration: script("ijam/set_reregistration.lua"),
            delete_network: script("ijam/delete_network.lua"),
            import_node: script("ijam/import_node.lua"),
            add_passphrases: script("ijam/add_passphrases.lua"),
            revoke_passphrase: script("ijam/revoke_passphrase.lua"),
            register: script("ijam/register.lua"),
            transition: script("ijam/transition.lua"),
            revoke_node: script("ijam/revoke_node.lua"),
            replace_sealed_key: script("ijam/replace_sealed_key.lua"),
            register_device: script("pubkey/register_device.lua"),
            attest_device: script("pubkey/attest_device.lua"),
            revoke_device: script("pubkey/revoke_device.lua"),
        }
    }
}

/// The connection in use and a generation number, bumped on every reconnect so that
/// many calls failing on the same dead connection replace it only once.
struct Live {
    conn: MultiplexedConnection,
    generation: u64,
    /// Set while the connection is dead and could not be replaced: calls fail at once
    /// (503) while a background task reconnects every `RECONNECT_INTERVAL`.
    broken_since: Option<std::time::Instant>,
    /// A background reconnect task is running.
    healing: bool,
}

/// How often the background task retries during an outage.
const RECONNECT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// A handle to one Redis server, shared by every flow's store (`ijam.rs`,
/// `pubkey.rs`): one connection, one reconnect loop.
pub struct RedisStore {
    inner: Arc<Inner>,
    scripts: Scripts,
    ijam: ijam::Caches,
}

pub(super) struct Inner {
    client: Client,
    config: AsyncConnectionConfig,
    live: Mutex<Live>,
    /// The URL with any password redacted; the only form that reaches logs and errors.
    url: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://[user:password@]host[:port][/db]`, `rediss://…`,
    /// `redis+unix://…`) and checks the server answers a PING, so a wrong URL fails at
    /// startup with `Unavailable` naming the URL (password redacted).
    pub async fn connect(url: &str) -> Result<RedisStore, StoreError> {
        let shown = redact_url(url);
        let unavailable = |cause: String| StoreError::Unavailable {
            url: shown.clone(),
            cause,
        };
        let client = Client::open(url).map_err(|e| unavailable(e.to_string()))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECTION_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if pong != "PONG" {
            return Err(unavailable(format!("unexpected PING reply {pong:?}")));
        }
        let inner = Inner {
            client,
            config,
            live: Mutex::new(Live {
                conn,
                generation: 0,
                broken_since: None,
                healing: false,
            }),
            url: shown,
        };
        Ok(RedisStore {
            inner: Arc::new(inner),
            scripts: Scripts::new(),
            ijam: ijam::Caches::default(),
        })
    }
}

impl Inner {
    /// A clone of the current connection (cheap: a handle to one multiplexed socket);
    /// during an outage, `Unavailable` at once.
    fn conn(&self) -> Result<(MultiplexedConnection, u64), StoreError> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        match live.broken_since {
            None => Ok((live.conn.clone(), live.generation)),
            Some(_) => Err(self.unavailable("connection lost; reconnecting".into())),
        }
    }

    /// Replaces the connection of `generation` (if no one else did already).
    async fn reconnect(&self, generation: u64) -> bool {
        let attempt = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await;
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.generation != generation {
            return true;
        }
        match attempt {
            Ok(conn) => {
                if let Some(since) = live.broken_since.take() {
                    tracing::info!(store = %self.url, down_for = ?since.elapsed(), "store reachable again");
                }
                live.conn = conn;
                live.generation += 1;
                true
            }
            Err(e) => {
                if live.broken_since.is_none() {
                    live.broken_since = Some(std::time::Instant::now());
                    tracing::error!(store = %self.url, error = %e, "store unavailable; requests get 503 until it is back");
                }
                false
            }
        }
    }

    /// Turns a Redis error into a `StoreError`. A dead connection (a multiplexed
    /// connection never heals itself) is replaced at once if Redis answers; if not,
    /// a background task keeps trying, so the first request after Redis returns is
    /// served. The failed call itself is not retried here: when it was `sent` and no
    /// reply came (not an error reply: Redis refuses before running anything), it may
    /// or may not have run, and the error says so ([`StoreError::OutcomeUnknown`]; see
    /// [`Inner::settle`]). Logs one line when the store goes away and one when it is back.
    async fn fail(self: &Arc<Self>, err: RedisError, generation: u64, sent: bool) -> StoreError {
        if err.code() == Some(CORRUPT_CODE) {
            return StoreError::Corrupt(err.detail().unwrap_or_default().to_owned());
        }
        let unknown = sent && err.code().is_none();
        if err.is_unrecoverable_error() && !self.reconnect(generation).await {
            let start_healing = {
                let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
                !std::mem::replace(&mut live.healing, true)
            };
            if start_healing {
                let inner = Arc::clone(self);
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(RECONNECT_INTERVAL).await;
                        let generation = inner
                            .live
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .generation;
                        if inner.reconnect(generation).await {
                            inner.live.lock().unwrap_or_else(|e| e.into_inner()).healing = false;
                            return;
                        }
                    }
                });
            }
        }
        if unknown {
            return StoreError::OutcomeUnknown {
                url: self.url.clone(),
                cause: err.to_string(),
            };
        }
        self.unavailable(err.to_string())
    }

    /// Runs `attempt` (an operation that gives the same answer when run again after it
    /// took effect: a replay record, a compare, an attempt id) until its outcome is
    /// known: an `OutcomeUnknown` is followed by re-runs, every [`SETTLE_RETRY`], until
    /// one gets an answer or `within` has passed since the first try. A store that is
    /// down meanwhile (`Unavailable`: nothing sent) is waited for, not answered, once an
    /// earlier try may have run.
    pub(super) async fn settle<T, F, Fut>(
        &self,
        within: Duration,
        mut attempt: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let deadline = tokio::time::Instant::now() + within;
        let mut unknown = None;
        loop {
            match attempt().await {
                Err(e @ StoreError::OutcomeUnknown { .. }) => {
                    tracing::debug!(store = %self.url, error = %e, "outcome unknown; running it again");
                    unknown = Some(e);
                }
                Err(StoreError::Unavailable { .. }) if unknown.is_some() => {}
                answered => {
                    if unknown.is_some() {
                        tracing::debug!(store = %self.url, "outcome settled by a re-run");
                    }
                    return answered;
                }
            }
            if tokio::time::Instant::now() + SETTLE_RETRY >= deadline {
                return Err(unknown.expect("set before any re-run"));
            }
            tokio::time::sleep(SETTLE_RETRY).await;
        }
    }

    fn unavailable(&self, cause: String) -> StoreError {
        StoreError::Unavailable {
            url: self.url.clone(),
            cause,
        }
    }

    /// Runs `script` with `keys` and `args`; the reply is a tag and its operands.
    pub(super) async fn run(
        self: &Arc<Self>,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let (mut conn, generation) = self.conn()?;
        match invocation.invoke_async::<Vec<String>>(&mut conn).await {
            Ok(reply) if !reply.is_empty() => Ok(reply),
            Ok(_) => Err(StoreError::Corrupt("empty script reply".into())),
            Err(err) => Err(self.fail(err, generation, true).await),
        }
    }

    /// Runs `script`, then `after` in the same round trip (commands whose replies are
    /// ignored: they run whatever the script answered). The script's reply is returned.
    pub(super) async fn run_then(
        self: &Arc<Self>,
        script: &Script,
        keys: &[String],
        args: &[String],
        after: impl Fn(&mut redis::Pipeline),
    ) -> Result<Vec<String>, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let mut pipe = redis::pipe();
        pipe.invoke_script(&invocation);
        after(&mut pipe);
        let (mut conn, generation) = self.conn()?;
        let mut replied = pipe.query_async::<(Vec<String>,)>(&mut conn).await;
        if let Err(err) = &replied
            && err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
        {
            // A restarted or flushed server forgot the script: load it, go again (the
            // commands after it are idempotent).
            if let Err(err) = invocation.load_async(&mut conn).await {
                return Err(self.fail(err, generation, false).await);
            }
            replied = pipe.query_async(&mut conn).await;
        }
        match replied {
            Ok((reply,)) if !reply.is_empty() => Ok(reply),
            Ok(_) => Err(StoreError::Corrupt("empty script reply".into())),
            Err(err) => Err(self.fail(err, generation, true).await),
        }
    }

    /// Runs a read-only pipeline.
    pub(super) async fn query<T: redis::FromRedisValue>(
        self: &Arc<Self>,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let (mut conn, generation) = self.conn()?;
        match pipe.query_async(&mut conn).await {
            Ok(v) => Ok(v),
            Err(err) => Err(self.fail(err, generation, false).await),
        }
    }
}

impl Stores for RedisStore {
    fn describe(&self) -> String {
        self.inner.url.clone()
    }
}

impl Inner {
    /// Every key matching `pattern` (SCAN: admin listings only, never a request).
    pub(super) async fn scan(self: &Arc<Self>, pattern: &str) -> Result<Vec<String>, StoreError> {
        let mut cursor = 0u64;
        let mut found = Vec::new();
        loop {
            let ((next, keys),): ((u64, Vec<String>),) = self
                .query(
                    redis::pipe()
                        .cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000),
                )
                .await?;
            found.extend(keys);
            if next == 0 {
                return Ok(found);
            }
            cursor = next;
        }
    }
}

/// `text` as a literal in a SCAN MATCH pattern.
pub(super) fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

pub(super) fn tag(reply: &[String]) -> &str {
    reply.first().map(String::as_str).unwrap_or_default()
}

pub(super) fn unexpected(script: &str, reply: &[String]) -> StoreError {
    StoreError::Corrupt(format!("{script} script replied {reply:?}"))
}

pub(super) fn field<'a>(
    what: &str,
    record: &'a HashMap<String, String>,
    name: &str,
) -> Result<&'a str, StoreError> {
    record
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| StoreError::Corrupt(format!("{what}: field {name:?} missing")))
}

pub(super) fn int_field(
    what: &str,
    record: &HashMap<String, String>,
    name: &str,
) -> Result<i64, StoreError> {
    let raw = field(what, record, name)?;
    raw.parse().map_err(|_| {
        StoreError::Corrupt(format!("{what}: field {name:?} is {raw:?}, not an integer"))
    })
}

/// `url` with the password replaced by `***`, both in the userinfo
/// (`redis://user:secret@host`) and in `pass=` / `password=` query parameters.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL the client will accept; show only that much.
        return "<unparsable redis url>".to_owned();
    };
    // The host part starts after the LAST '@': a password may itself hold '@' or '/'.
    let (userinfo, after) = match rest.rsplit_once('@') {
        Some((userinfo, after)) => (Some(userinfo), after),
        None => (None, rest),
    };
    let mut out = format!("{scheme}://");
    if let Some(userinfo) = userinfo {
        match userinfo.split_once(':') {
            Some((user, _password)) => out.push_str(&format!("{user}:***@")),
            None => out.push_str(&format!("{userinfo}@")),
        }
    }
    match after.split_once('?') {
        None => out.push_str(after),
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((k, _)) if k == "pass" || k == "password" => format!("{k}=***"),
                    _ => param.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redacts_passwords() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://:s3cret@host:6379", "redis://:***@host:6379"),
            ("rediss://user:s3cret@host/2", "rediss://user:***@host/2"),
            ("redis://user@host", "redis://user@host"),
            ("redis://:p@ss/w@rd@host/1", "redis://:***@host/1"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=s3cret",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            (
                "redis://host?password=s3cret&protocol=resp3",
                "redis://host?password=***&protocol=resp3",
            ),
            ("not a url", "<unparsable redis url>"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
