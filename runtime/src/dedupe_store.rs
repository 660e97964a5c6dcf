//! A dedupe store shared by several weir processes: Redis.
//!
//! Each idempotency key of a consumer group is one Redis key, `weir:dedupe:<group>:<key>`,
//! whose value is the claim token of the process handling it (with a short expiry, so a claim
//! dies with its holder) or `done` (kept for the dedupe window). Claiming is one Lua script, so
//! two processes can never both hold a key. The engine asks through [`SharedStore`]; this is the
//! only module that names the redis crate.

use crate::engine::dedupe::{Claim, SharedStore, StoreError};
use std::sync::Mutex;
use std::time::Duration;

/// Idle connections kept for the next calls.
const MAX_IDLE: usize = 16;

/// How long one Redis request may take before the store counts as not answering.
const TIMEOUT: Duration = Duration::from_millis(500);

/// Claims a key unless it is done or claimed by another token; renews our own claim. A key
/// finished by anyone (`fin|TOKEN|PLACE`) is claimed when asked from the same place (the
/// message itself, delivered again) and is a duplicate otherwise. ARGV: token, ttl, place.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == 'done' then return 2 end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
local place = string.match(v, '^fin|[^|]*|(.*)$')
if place then
  if place == ARGV[3] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
  end
  return 2
end
return 3
";

/// Turns our claim into a finished one. ARGV: token, ttl, place.
const FINISH: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], 'fin|' .. ARGV[1] .. '|' .. ARGV[3], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Deletes a key only while it holds our claim, running or finished (never a `done` mark,
/// never another's claim).
const RELEASE: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or (v and string.sub(v, 1, string.len(ARGV[1]) + 5) == 'fin|' .. ARGV[1] .. '|') then
  return redis.call('DEL', KEYS[1])
end
return 0
";

pub struct RedisStore {
    url: String,
    client: redis::Client,
    /// Idle connections. A call takes one (or connects), uses it without the lock, and puts it
    /// back unless it failed; so partitions screening at once each have a connection rather
    /// than queue behind one. (A stack of idle connections is all this needs; a pool crate
    /// such as r2d2 would add its own reaper thread and settings for it.)
    idle: Mutex<Vec<redis::Connection>>,
    release: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .finish()
    }
}

impl RedisStore {
    /// Checks the URL; connects on first use.
    pub fn new(url: &str) -> Result<RedisStore, String> {
        let client = redis::Client::open(url).map_err(|e| format!("`{url}`: {e}"))?;
        Ok(RedisStore {
            url: url.to_string(),
            client,
            idle: Mutex::new(Vec::new()),
            release: redis::Script::new(RELEASE),
        })
    }

    fn key(group: &str, key: &[u8]) -> Vec<u8> {
        let mut k = format!("weir:dedupe:{group}:").into_bytes();
        k.extend_from_slice(key);
        k
    }

    /// Runs `f` on an idle connection, or a new one; a connection that failed is dropped.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let idle = self.idle.lock().expect("redis connections lock").pop();
        let mut c = match idle {
            Some(c) => c,
            None => {
                let c = self
                    .client
                    .get_connection_with_timeout(TIMEOUT)
                    .map_err(|e| self.error(e))?;
                c.set_read_timeout(Some(TIMEOUT))
                    .map_err(|e| self.error(e))?;
                c.set_write_timeout(Some(TIMEOUT))
                    .map_err(|e| self.error(e))?;
                c
            }
        };
        let result = f(&mut c);
        if result.is_ok() {
            let mut idle = self.idle.lock().expect("redis connections lock");
            if idle.len() < MAX_IDLE {
                idle.push(c);
            }
        }
        result.map_err(|e| self.error(e))
    }

    fn error(&self, e: redis::RedisError) -> StoreError {
        StoreError(format!(
            "the dedupe store at {} is not answering: {e}",
            self.url
        ))
    }
}

impl SharedStore for RedisStore {
    fn claim_many(
        &self,
        group: &str,
        keys: &[(&[u8], &str)],
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<Claim>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // One pipeline of EVALs: a round trip per lane's screening, not per message.
        let mut pipe = redis::pipe();
        for (key, place) in keys {
            pipe.cmd("EVAL")
                .arg(CLAIM)
                .arg(1)
                .arg(Self::key(group, key))
                .arg(token)
                .arg(ttl.as_millis() as u64)
                .arg(*place);
        }
        let answers: Vec<i64> = self.with(|c| pipe.query(c))?;
        Ok(answers
            .into_iter()
            .map(|r| match r {
                1 => Claim::Mine,
                2 => Claim::Done,
                _ => Claim::Busy,
            })
            .collect())
    }

    fn finish(
        &self,
        group: &str,
        keys: &[(Vec<u8>, String)],
        token: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (key, place) in keys {
            pipe.cmd("EVAL")
                .arg(FINISH)
                .arg(1)
                .arg(Self::key(group, key))
                .arg(token)
                .arg(ttl.as_millis() as u64)
                .arg(place)
                .ignore();
        }
        self.with(|c| pipe.query::<()>(c))
    }

    fn mark_done(&self, group: &str, keys: &[Vec<u8>], window: Duration) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET")
                .arg(Self::key(group, key))
                .arg("done")
                .arg("PX")
                .arg(window.as_millis() as u64)
                .ignore();
        }
        self.with(|c| pipe.query::<()>(c))
    }

    fn release(&self, group: &str, keys: &[Vec<u8>], token: &str) -> Result<(), StoreError> {
        for key in keys {
            let k = Self::key(group, key);
            self.with(|c| self.release.key(k).arg(token).invoke::<i64>(c))?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

#[cfg(test)]
mod tests {
    //! The claim scripts against the machine's Redis (127.0.0.1:6379; scripts/services.sh
    //! starts it), under a group name of their own.
    use super::*;

    #[test]
    fn a_finished_claim_makes_copies_duplicates_and_lets_its_own_message_run_again() {
        let store = RedisStore::new("redis://127.0.0.1:6379").unwrap();
        let group = format!("unit-{}-{:x}", std::process::id(), rand::random::<u32>());
        let ttl = Duration::from_secs(60);
        let k = b"k".to_vec();
        // (process, step, the place of its message, a claim's answer)
        let steps: &[(&str, &str, &str, Option<Claim>)] = &[
            ("a", "claim", "t/0/5", Some(Claim::Mine)),
            ("b", "claim", "t/1/9", Some(Claim::Busy)),
            // a is done with t/0/5 and its mark waits: a copy from elsewhere is a duplicate.
            ("a", "finish", "t/0/5", None),
            ("b", "claim", "t/1/9", Some(Claim::Done)),
            // a stopped before writing its mark: t/0/5 delivered to b is the message itself.
            ("b", "claim", "t/0/5", Some(Claim::Mine)),
            ("a", "claim", "t/0/5", Some(Claim::Busy)),
            // a's release leaves b's claim alone; b's release of its finished claim lets go.
            ("a", "release", "", None),
            ("c", "claim", "t/2/1", Some(Claim::Busy)),
            ("b", "finish", "t/0/5", None),
            ("b", "release", "", None),
            ("c", "claim", "t/2/1", Some(Claim::Mine)),
        ];
        for (n, (who, step, place, want)) in steps.iter().enumerate() {
            let got = match *step {
                "claim" => Some(
                    store
                        .claim_many(&group, &[(k.as_slice(), *place)], who, ttl)
                        .expect("Redis answers (scripts/services.sh starts it)")[0],
                ),
                "finish" => {
                    let keys = [(k.clone(), place.to_string())];
                    store.finish(&group, &keys, who, ttl).unwrap();
                    None
                }
                _ => {
                    store
                        .release(&group, std::slice::from_ref(&k), who)
                        .unwrap();
                    None
                }
            };
            assert_eq!(got, *want, "step {n}: {who} {step} {place}");
        }
        store.release(&group, &[k], "c").unwrap();
    }
}
