//! Authentication and scopes, and that no secret reaches a log line.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tokenlease::grpc::pb;
use tonic::{Code, Request};

use super::fixtures::{PoolSetup, app_with, token_secret};
use super::helpers::{Counters, Db, authed};

/// Missing key, malformed key, wrong key, worker key on admin RPCs and worker key for
/// another tenant each get their status.
#[tokio::test]
async fn statuses_for_every_auth_failure() {
    let pool = PoolSetup::default();
    let (_env, app) = app_with(Db::Sqlite, Counters::Memory, pool, &["acme", "other"]).await;
    let mut admin = app.admin().await;
    let worker = app.worker_key(&["acme"]).await;
    let mut lease = app.lease().await;
    let acquire = |tenant: &str| pb::AcquireLeaseRequest {
        tenant_id: tenant.into(),
        ..Default::default()
    };

    let missing = lease
        .acquire_lease(Request::new(acquire("acme")))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(
        missing.message().contains("authorization"),
        "{}",
        missing.message()
    );
    let malformed = lease
        .acquire_lease(authed(acquire("acme"), "hunter2"))
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::Unauthenticated);
    let mut wrong = worker.clone();
    wrong.replace_range(wrong.len() - 4.., "0000");
    let wrong = lease
        .acquire_lease(authed(acquire("acme"), &wrong))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);

    let on_admin = admin
        .list_tenants(authed(pb::ListTenantsRequest::default(), &worker))
        .await
        .unwrap_err();
    assert_eq!(on_admin.code(), Code::PermissionDenied);
    assert!(
        on_admin.message().contains("admin"),
        "{}",
        on_admin.message()
    );
    let other = lease
        .acquire_lease(authed(acquire("other"), &worker))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    assert!(other.message().contains("other"), "{}", other.message());
    let watch = lease
        .watch_events(authed(
            pb::WatchEventsRequest {
                tenant_ids: vec!["other".into()],
                ..Default::default()
            },
            &worker,
        ))
        .await;
    assert_eq!(watch.err().map(|e| e.code()), Some(Code::PermissionDenied));

    // The worker's own tenant works, and the worker cannot release the other tenant's lease.
    let own = lease
        .acquire_lease(authed(acquire("acme"), &worker))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        own.result,
        Some(pb::acquire_lease_response::Result::Lease(_))
    ));
    let theirs = lease
        .acquire_lease(authed(acquire("other"), &app.admin_key))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::acquire_lease_response::Result::Lease(theirs)) = theirs.result else {
        panic!("lease expected")
    };
    let release = pb::ReleaseLeaseRequest {
        lease_id: theirs.lease_id,
        outcome: pb::ReleaseOutcome::Success as i32,
        ..Default::default()
    };
    let err = lease
        .release_lease(authed(release, &worker))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // A revoked key stops working.
    let keys = admin
        .list_api_keys(authed(pb::ListApiKeysRequest::default(), &app.admin_key))
        .await
        .unwrap()
        .into_inner();
    let worker_id = keys
        .api_keys
        .iter()
        .find(|k| k.role == pb::ApiKeyRole::Worker as i32)
        .unwrap()
        .id
        .clone();
    admin
        .delete_api_key(authed(
            pb::DeleteApiKeyRequest { id: worker_id },
            &app.admin_key,
        ))
        .await
        .unwrap();
    let revoked = lease
        .acquire_lease(authed(acquire("acme"), &worker))
        .await
        .unwrap_err();
    assert_eq!(revoked.code(), Code::Unauthenticated);
}

/// A shared buffer that a tracing subscriber writes into.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// With logging at TRACE, a session that creates tokens and keys, leases, fails auth and
/// sends bad secrets writes no token and no API key into any log line.
#[tokio::test(flavor = "current_thread")]
async fn no_secret_reaches_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let pool = PoolSetup {
        tokens: 2,
        ..Default::default()
    };
    let (_env, app) = app_with(Db::Sqlite, Counters::Memory, pool, &["acme"]).await;
    let mut admin = app.admin().await;
    let worker = app.worker_key(&["acme"]).await;
    let mut lease = app.lease().await;
    for _ in 0..3 {
        let req = pb::AcquireLeaseRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        };
        lease.acquire_lease(authed(req, &worker)).await.unwrap();
    }
    let bad_secret = "BAD-SECRET\nWITH-NEWLINE";
    let token = pb::Token {
        id: "t9".into(),
        upstream_id: "up".into(),
        secret: bad_secret.into(),
        owner: Some(pb::token::Owner::PoolId("shared".into())),
        ..Default::default()
    };
    let _ = admin
        .create_token(authed(
            pb::CreateTokenRequest { token: Some(token) },
            &app.admin_key,
        ))
        .await;
    let _ = lease
        .acquire_lease(authed(
            pb::AcquireLeaseRequest {
                tenant_id: "acme".into(),
                ..Default::default()
            },
            &format!("{worker}x"),
        ))
        .await;
    let admin_key = app.admin_key.clone();
    app.stop().await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.lines().count() > 5,
        "the subscriber captured the server's logs:\n{logs}"
    );
    for secret in [
        token_secret(0),
        token_secret(1),
        "BAD-SECRET".into(),
        app_key_secret(&worker),
        app_key_secret(&admin_key),
    ] {
        assert!(!logs.contains(&secret), "a secret reached the logs");
    }
}

/// The secret part of a `tl_<id>_<secret>` key.
fn app_key_secret(key: &str) -> String {
    key.rsplit('_').next().unwrap().to_owned()
}
