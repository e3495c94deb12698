//! TLS: with a certificate configured the server speaks only TLS (rustls).

use tokenlease::grpc::pb::{self, admin_service_client::AdminServiceClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use super::helpers::{Counters, Db, TestEnv, authed};

/// A client trusting the server's certificate gets answers over TLS; a plaintext client
/// gets none.
#[tokio::test]
async fn serves_tls_when_a_certificate_is_configured() {
    let env = TestEnv::new(Db::Sqlite, Counters::Memory).await;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = env.dir.path().join("server.pem");
    let key_path = env.dir.path().join("server.key");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let mut settings = env.settings();
    settings.tls = Some(tokenlease::config::TlsSection {
        cert_path,
        key_path,
    });
    let app = env.spawn_with(settings).await;

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{}", app.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS connect");
    let tiers = AdminServiceClient::new(channel)
        .list_tiers(authed(pb::ListTiersRequest::default(), &app.admin_key))
        .await
        .unwrap();
    assert_eq!(tiers.into_inner().tiers.len(), 3);

    let plain = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(channel) => AdminServiceClient::new(channel)
            .list_tiers(authed(pb::ListTiersRequest::default(), &app.admin_key))
            .await
            .is_err(),
    };
    assert!(refused, "a plaintext client must not be served");
}
