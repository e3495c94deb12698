//! Server reflection (v1 and v1alpha, for grpcurl) and grpc.health.v1.

use tokio_stream::StreamExt;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use super::helpers::{Counters, Db, TestEnv};

/// Reflection lists both services and health, and health says SERVING.
#[tokio::test]
async fn reflection_lists_services_and_health_serves() {
    let env = TestEnv::new(Db::Sqlite, Counters::Memory).await;
    let app = env.spawn().await;
    let channel = app.channel().await;

    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "tokenlease.v1.LeaseService",
        "tokenlease.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    let mut health = HealthClient::new(channel);
    for service in ["tokenlease.v1.LeaseService", "tokenlease.v1.AdminService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.status, ServingStatus::Serving as i32, "{service}");
    }
}

/// Issue 14 (first hour): error details (google.rpc.BadRequest, RetryInfo…) are served
/// through reflection, so grpcurl can print them instead of "is not recognized".
#[tokio::test]
async fn reflection_knows_the_error_details() {
    let env = TestEnv::new(Db::Sqlite, Counters::Memory).await;
    let app = env.spawn().await;
    let mut reflection = ServerReflectionClient::new(app.channel().await);
    for symbol in ["google.rpc.BadRequest", "google.rpc.RetryInfo"] {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::once(request))
            .await
            .unwrap()
            .into_inner();
        let response = responses.next().await.unwrap().unwrap();
        assert!(
            matches!(
                response.message_response,
                Some(MessageResponse::FileDescriptorResponse(_))
            ),
            "{symbol}: {response:?}"
        );
    }
}
