//! A Redis user that the ACL restricts: what it may not run is answered `Unavailable`
//! (callers retry; the operator can mend the ACL while the service runs) with what to
//! grant, and a user that may not load functions works once another user has loaded the
//! library that `tokenlease redis-functions` prints.

use super::faults::{Throwaway, counters_with, free_port, fresh, request};
use super::*;

/// Sends one command as the server's default user (every permission).
async fn as_admin(server: &Throwaway, cmd: &redis::Cmd) {
    let client = redis::Client::open(server.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect as the default user");
    cmd.query_async::<redis::Value>(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
}

/// Counters that connect as a user `leaser` with the ACL `rules` (`{prefix}` in a rule
/// is the counters' key prefix).
async fn as_user(server: &Throwaway, rules: &[&str]) -> RedisCounters {
    let prefix = format!("tltest-{}", uuid::Uuid::new_v4().simple());
    let mut acl = redis::cmd("ACL");
    acl.arg("SETUSER")
        .arg("leaser")
        .arg(&["reset", "on", ">secret", "&*"][..]);
    for rule in rules {
        acl.arg(rule.replace("{prefix}", &prefix));
    }
    as_admin(server, &acl).await;
    let url = server.url().replace("redis://", "redis://leaser:secret@");
    counters_with(&url, &prefix, false).await
}

async fn mark_fresh(counters: &RedisCounters) -> Result<(), CounterError> {
    counters.mark_fresh(Space::upstream(&id(UPSTREAM))).await
}

/// A user with every permission but the `denied` command, the upstream marked fresh.
async fn restricted(server: &Throwaway, denied: &str) -> RedisCounters {
    let counters = as_user(server, &["~*", "+@all", &format!("-{denied}")]).await;
    mark_fresh(&counters)
        .await
        .expect("the fence is written by a plain script, which the user may run");
    counters
}

fn assert_told_to_grant<T: std::fmt::Debug>(answer: Result<T, CounterError>, denied: &str) {
    match answer {
        Err(CounterError::Unavailable(why)) => {
            assert!(
                why.contains(denied) || why.contains("ACL LOG"),
                "names what was refused, or where to read it: {why}"
            );
            assert!(
                why.contains("tokenlease redis-functions | redis-cli -x FUNCTION LOAD REPLACE"),
                "says how to load the library: {why}"
            );
        }
        other => panic!("expected Unavailable naming {denied}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_user_that_may_not_load_functions_works_once_the_library_is_loaded_for_it() {
    let server = Throwaway::start(free_port()).await;
    let counters = restricted(&server, "function|load").await;
    let req = request();
    for _ in 0..2 {
        assert_told_to_grant(counters.acquire(&fresh(&req)).await, "function|load");
    }

    let mut load = redis::cmd("FUNCTION");
    load.arg("LOAD").arg("REPLACE").arg(redis_functions());
    as_admin(&server, &load).await;
    let answer = counters.acquire(&fresh(&req)).await;
    assert!(
        matches!(answer, Ok(AcquireOutcome::Granted(_))),
        "granted once the library is there: {answer:?}"
    );
}

#[tokio::test]
async fn a_user_that_may_not_call_functions_is_told_what_to_grant() {
    let server = Throwaway::start(free_port()).await;
    let counters = restricted(&server, "fcall").await;
    assert_told_to_grant(counters.acquire(&request()).await, "fcall");
}

/// A command refused inside a script or function (INFO, which the fence's scripts run
/// to know the Redis process) comes back as an error of the script, not NOPERM: still
/// told what to do.
#[tokio::test]
async fn a_command_refused_inside_a_script_is_told_what_to_grant() {
    let server = Throwaway::start(free_port()).await;
    let counters = as_user(&server, &["~*", "+@all", "-info"]).await;
    assert_told_to_grant(mark_fresh(&counters).await, "ACL LOG");
    assert_told_to_grant(counters.acquire(&request()).await, "ACL LOG");
}

/// What the README lists for the service's Redis user is enough to lease: its keys
/// only, the scripting commands, what the functions run.
#[tokio::test]
async fn the_permissions_the_readme_lists_are_enough_to_lease() {
    let server = Throwaway::start(free_port()).await;
    let rules = [
        "~{prefix}:*",
        "+@scripting",
        "+@read",
        "+@write",
        "+time",
        "+info",
        "+@connection",
    ];
    let counters = as_user(&server, &rules).await;
    mark_fresh(&counters).await.expect("mark fresh");
    let req = request();
    let Ok(AcquireOutcome::Granted(grant)) = counters.acquire(&req).await else {
        panic!("granted with the README's permissions");
    };
    let key = lease_of(&req, &grant.token_id);
    let released = counters.release(&key, ReleaseOutcome::Success).await;
    assert!(
        matches!(released, Ok(ReleaseResult::Released)),
        "{released:?}"
    );
}
