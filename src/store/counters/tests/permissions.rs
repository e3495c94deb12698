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

/// A user `leaser` with every permission but the `denied` command, and counters that
/// connect as it.
async fn restricted(server: &Throwaway, denied: &str) -> RedisCounters {
    let mut acl = redis::cmd("ACL");
    acl.arg("SETUSER")
        .arg("leaser")
        .arg(&["reset", "on", ">secret", "~*", "&*", "+@all"][..])
        .arg(format!("-{denied}"));
    as_admin(server, &acl).await;
    let url = server.url().replace("redis://", "redis://leaser:secret@");
    let prefix = format!("tltest-{}", uuid::Uuid::new_v4().simple());
    let counters = counters_with(&url, &prefix, false).await;
    counters
        .mark_fresh(Space::upstream(&id(UPSTREAM)))
        .await
        .expect("the fence is written by a plain script, which the user may run");
    counters
}

fn assert_told_to_grant(answer: Result<AcquireOutcome, CounterError>, denied: &str) {
    match answer {
        Err(CounterError::Unavailable(why)) => {
            assert!(why.contains(denied), "names what was refused: {why}");
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
