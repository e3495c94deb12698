//! TLS: with a certificate configured the server speaks only TLS (rustls).

use tokenlease::grpc::pb::{self, admin_service_client::AdminServiceClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use super::helpers::{Counters, Db, TestApp, TestEnv, authed};

/// Starts a server of `env` with a fresh self-signed certificate for `localhost`, and
/// returns it with a client TLS configuration that trusts that certificate.
pub async fn spawn_with_tls(env: &TestEnv) -> (TestApp, ClientTlsConfig) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = env.dir.path().join("server.pem");
    let key_path = env.dir.path().join("server.key");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let mut settings = env.settings();
    settings.tls = Some(tokenlease::config::TlsSection {
        cert_path,
        key_path,
        client_ca_path: None,
    });
    let app = env.spawn_with(settings).await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    (app, tls)
}

/// A client trusting the server's certificate gets answers over TLS; a plaintext client
/// gets none.
#[tokio::test]
async fn serves_tls_when_a_certificate_is_configured() {
    let env = TestEnv::new(Db::Sqlite, Counters::Memory).await;
    let (app, tls) = spawn_with_tls(&env).await;
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

/// Issue 11: optional mutual TLS. With `tls.client_ca_path` set, a client presenting a
/// certificate that CA signed is served; one without a certificate, or with one signed
/// by another CA, is not (the handshake fails before any API key is read).
#[tokio::test]
async fn mutual_tls_admits_only_clients_the_ca_signed() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };
    use tonic::transport::Identity;

    let env = TestEnv::new(Db::Sqlite, Counters::Memory).await;
    let server = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    };
    let (workers_ca, other_ca) = (ca("workers CA"), ca("another CA"));
    let client = |issuer: &CertifiedIssuer<'_, KeyPair>| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["worker".to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, issuer).unwrap();
        Identity::from_pem(cert.pem(), key.serialize_pem())
    };
    let path = |name: &str, body: String| {
        let path = env.dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        path
    };
    let mut settings = env.settings();
    settings.tls = Some(tokenlease::config::TlsSection {
        cert_path: path("server.pem", server.cert.pem()),
        key_path: path("server.key", server.signing_key.serialize_pem()),
        client_ca_path: Some(path("clients-ca.pem", workers_ca.pem())),
    });
    let app = env.spawn_with(settings).await;
    let call = |identity: Option<Identity>| {
        let server_cert = server.cert.pem();
        let key = app.admin_key.clone();
        let port = app.addr.port();
        async move {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(server_cert))
                .domain_name("localhost");
            if let Some(identity) = identity {
                tls = tls.identity(identity);
            }
            let channel = Channel::from_shared(format!("https://localhost:{port}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            AdminServiceClient::new(channel)
                .list_tiers(authed(pb::ListTiersRequest::default(), &key))
                .await
                .map(|r| r.into_inner().tiers.len())
                .map_err(|s| s.to_string())
        }
    };
    assert_eq!(call(Some(client(&workers_ca))).await, Ok(3));
    assert!(call(None).await.is_err(), "no client certificate");
    assert!(
        call(Some(client(&other_ca))).await.is_err(),
        "a certificate of another CA"
    );
}
