//! A measurement, not the product: tokenlease's pure ledger (`tokenlease::ledger`)
//! inside Redis, as a module native type, one key per counters space. It answers one
//! question: what does Redis spend per AcquireLease + ReleaseLease pair when the
//! decision is the ledger's Rust code, against the Lua transliteration the service
//! loads today (`drive.py` sends the same pairs to both).
//!
//! It is wired to the lease bench's shape only: upstream `bench`, pool `p0`, no
//! dedicated tokens, a first attempt that does not wait, a SUCCESS release. What a
//! real module needs beyond it is listed in README.md here.
//!
//! Commands:
//! - `TL.POOL <digest> <token>…` keeps a pool's token list under its digest (the
//!   service would send it once per space, as it sends the Lua index its tokens);
//! - `TL.ACQUIRE <space key> <tenant> <nonce> <tenant_limit> <token_limit>
//!   <window_ms> <ttl_ms> <cost> <pace_burst> <config_version> <count_demand 0|1>
//!   <queue_id> <priority_offset_ms> <wait_ms> <guaranteed> <digest>` answers
//!   `[1, token, now, expires, tenant_used, token_used]` when granted, `[0, denial]`
//!   or `[2, token]` (the token's health refused it);
//! - `TL.RELEASE <space key> <tenant> <token> <nonce> <outcome> <failures_to_open>
//!   <open_ms> <successes_to_close> <block_ms> <max_block_ms> <repeat_ms>` answers
//!   `[result, applied]` (result as the Lua release's: 1 released, 2 already, 3
//!   another outcome before, 4 unknown).
//!
//! Time is the Redis host's clock, read per command, as the Lua reads `TIME`.

use std::collections::HashMap;
use std::os::raw::{c_int, c_void};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis_module::native_types::RedisType;
use redis_module::{Context, RedisError, RedisResult, RedisString, RedisValue, raw, redis_module};
use tokenlease::clock::system_now_ms;
use tokenlease::domain::{BreakerPolicy, Id};
use tokenlease::ledger::{
    AcquireOutcome, AcquireRequest, LeaseKey, Ledger, OutcomeReport, QueueTicket, ReleaseOutcome,
    ReleaseResult,
};

/// The one upstream and pool of the lease bench.
static UPSTREAM: LazyLock<Id> = LazyLock::new(|| Id::parse("id", "bench").expect("a valid id"));
static POOL: LazyLock<Id> = LazyLock::new(|| Id::parse("id", "p0").expect("a valid id"));

/// A space's counters: a ledger. A new one holds its upstream until marked fresh, so
/// a key that was lost (or loaded from an RDB file, which keeps nothing: `rdb_load`)
/// holds as the Lua fence does.
struct Space {
    ledger: Ledger,
}

/// The RDB callbacks are required: without `rdb_save`, `SAVE` (or a replica's full
/// sync) crashes Redis 7.0 (measured). A space is saved as its format version only and
/// loads as a lost one.
static SPACE_TYPE: RedisType = RedisType::new(
    "tl-ledger",
    0,
    raw::RedisModuleTypeMethods {
        version: raw::REDISMODULE_TYPE_METHOD_VERSION as u64,
        rdb_load: Some(rdb_load),
        rdb_save: Some(rdb_save),
        aof_rewrite: None,
        free: Some(free),
        mem_usage: None,
        digest: None,
        aux_load: None,
        aux_save: None,
        aux_save2: None,
        aux_save_triggers: 0,
        free_effort: None,
        unlink: None,
        copy: None,
        defrag: None,
        copy2: None,
        free_effort2: None,
        mem_usage2: None,
        unlink2: None,
    },
);

unsafe extern "C" fn free(value: *mut c_void) {
    // SAFETY: Redis hands back the pointer `set_value` boxed, once.
    drop(unsafe { Box::from_raw(value.cast::<Space>()) });
}

unsafe extern "C" fn rdb_save(rdb: *mut raw::RedisModuleIO, _value: *mut c_void) {
    raw::save_unsigned(rdb, 0);
}

unsafe extern "C" fn rdb_load(rdb: *mut raw::RedisModuleIO, _encver: c_int) -> *mut c_void {
    if raw::load_unsigned(rdb).is_err() {
        return std::ptr::null_mut();
    }
    Box::into_raw(Box::new(Space {
        ledger: Ledger::default(),
    }))
    .cast()
}

/// Pools by digest. Redis runs commands on one thread; the mutex only makes it a
/// `static`.
type Pools = HashMap<String, (Arc<[Id]>, Arc<str>)>;
static POOLS: Mutex<Option<Pools>> = Mutex::new(None);

fn id(arg: &RedisString) -> Result<Id, RedisError> {
    Id::parse("id", arg.try_as_str()?).map_err(|e| RedisError::String(e.to_string()))
}

fn int(arg: &RedisString) -> Result<i64, RedisError> {
    arg.parse_integer()
}

fn count(arg: &RedisString) -> Result<u32, RedisError> {
    u32::try_from(int(arg)?).map_err(|_| RedisError::Str("ERR a count out of range"))
}

fn millis(arg: &RedisString) -> Result<Duration, RedisError> {
    u64::try_from(int(arg)?)
        .map(Duration::from_millis)
        .map_err(|_| RedisError::Str("ERR a negative duration"))
}

/// Runs `f` on the space at `key`, created (marked fresh, as the bench's new upstream
/// is) when missing.
fn with_space<T>(
    ctx: &Context,
    key: &RedisString,
    f: impl FnOnce(&mut Ledger) -> T,
) -> RedisResult<T> {
    let key = ctx.open_key_writable(key);
    if let Some(space) = key.get_value::<Space>(&SPACE_TYPE)? {
        return Ok(f(&mut space.ledger));
    }
    let mut space = Space {
        ledger: Ledger::default(),
    };
    space.ledger.mark_fresh(&UPSTREAM);
    let out = f(&mut space.ledger);
    key.set_value(&SPACE_TYPE, space)?;
    Ok(out)
}

fn pool(_ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() < 3 {
        return Err(RedisError::WrongArity);
    }
    let digest = args[1].try_as_str()?.to_owned();
    let tokens: Vec<Id> = args[2..].iter().map(id).collect::<Result<_, _>>()?;
    let mut pools = POOLS.lock().unwrap_or_else(|p| p.into_inner());
    let entry = (tokens.into(), Arc::from(digest.as_str()));
    pools.get_or_insert_with(HashMap::new).insert(digest, entry);
    Ok(RedisValue::Integer(1))
}

fn known_pool(digest: &str) -> Result<(Arc<[Id]>, Arc<str>), RedisError> {
    let pools = POOLS.lock().unwrap_or_else(|p| p.into_inner());
    pools
        .as_ref()
        .and_then(|p| p.get(digest))
        .cloned()
        .ok_or(RedisError::Str(
            "ERR unknown pool digest: send TL.POOL first",
        ))
}

fn acquire_request(args: &[RedisString]) -> Result<AcquireRequest, RedisError> {
    let (pooled, digest) = known_pool(args[16].try_as_str()?)?;
    Ok(AcquireRequest {
        upstream_id: UPSTREAM.clone(),
        pool_id: Some(POOL.clone()),
        config_version: int(&args[10])?,
        nonce: args[3].try_as_str()?.to_owned(),
        tenant_id: id(&args[2])?,
        tenant_limit: count(&args[4])?,
        token_limit: count(&args[5])?,
        window: millis(&args[6])?,
        lease_ttl: millis(&args[7])?,
        cost: count(&args[8])?,
        dedicated: vec![],
        pooled,
        pooled_digest: Some(digest),
        count_demand: int(&args[11])? == 1,
        queue: Some(QueueTicket {
            queue_id: args[12].try_as_str()?.to_owned(),
            priority_offset_ms: int(&args[13])?,
            score: None,
            wait_ms: int(&args[14])?,
            guaranteed: count(&args[15])?,
        }),
        pace_burst: count(&args[9])?,
    })
}

fn acquire(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 17 {
        return Err(RedisError::WrongArity);
    }
    let req = acquire_request(&args)?;
    let now = system_now_ms();
    let outcome = with_space(ctx, &args[1], |ledger| ledger.acquire(&req, now))?;
    Ok(RedisValue::Array(match outcome {
        AcquireOutcome::Granted(g) => vec![
            RedisValue::Integer(1),
            RedisValue::BulkString(g.token_id.to_string()),
            RedisValue::Integer(g.now_ms),
            RedisValue::Integer(g.expires_at_ms),
            RedisValue::Integer(g.tenant_used.into()),
            RedisValue::Integer(g.token_used.into()),
        ],
        AcquireOutcome::Denied(d) => vec![
            RedisValue::Integer(0),
            RedisValue::BulkString(format!("{d:?}")),
        ],
        AcquireOutcome::Unhealthy(u) => vec![
            RedisValue::Integer(2),
            RedisValue::BulkString(u.token_id.to_string()),
        ],
    }))
}

fn outcome(arg: &RedisString) -> Result<ReleaseOutcome, RedisError> {
    ReleaseOutcome::parse(arg.try_as_str()?).ok_or(RedisError::Str("ERR unknown outcome"))
}

fn release(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 12 {
        return Err(RedisError::WrongArity);
    }
    let report = OutcomeReport {
        key: LeaseKey {
            upstream_id: UPSTREAM.clone(),
            pool_id: Some(POOL.clone()),
            tenant_id: id(&args[2])?,
            token_id: id(&args[3])?,
            nonce: args[4].try_as_str()?.to_owned(),
        },
        outcome: outcome(&args[5])?,
        blocked_until_ms: None,
        block_duration: millis(&args[9])?,
        max_block: millis(&args[10])?,
        repeat_for: millis(&args[11])?,
        policy: BreakerPolicy {
            failures_to_open: count(&args[6])?,
            open_for: millis(&args[7])?,
            successes_to_close: count(&args[8])?,
        },
    };
    let now = system_now_ms();
    let (result, recorded) = with_space(ctx, &args[1], |ledger| {
        ledger.release_reporting(&report, now)
    })?;
    let code = match result {
        ReleaseResult::Released => 1,
        ReleaseResult::AlreadyReleased => 2,
        ReleaseResult::Conflict { .. } => 3,
        _ => 4,
    };
    Ok(RedisValue::Array(vec![
        RedisValue::Integer(code),
        RedisValue::Integer(i64::from(recorded.is_some_and(|r| r.applied))),
    ]))
}

redis_module! {
    name: "tlledgerbench",
    version: 1,
    allocator: (redis_module::alloc::RedisAlloc, redis_module::alloc::RedisAlloc),
    data_types: [SPACE_TYPE],
    commands: [
        ["tl.acquire", acquire, "write deny-oom", 1, 1, 1, ""],
        ["tl.release", release, "write", 1, 1, 1, ""],
        ["tl.pool", pool, "write", 0, 0, 0, ""],
    ],
}
