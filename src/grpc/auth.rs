//! The authentication interceptor: every call of the two services carries
//! `authorization: Bearer <api key>`; the resulting `Caller` rides in the request's
//! extensions. Health and reflection are left open (probes and schema discovery carry
//! no tenant data).

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::auth::Caller;
use crate::lease::LiveConfig;

/// Checks the API key against the live configuration snapshot.
#[derive(Clone)]
pub struct AuthInterceptor {
    pub config: LiveConfig,
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = match request.metadata().get("authorization") {
            None => None,
            Some(value) => Some(value.to_str().map_err(|_| {
                Status::unauthenticated("the authorization metadata is not valid ASCII")
            })?),
        };
        let snapshot = self.config.current();
        let caller = Caller::authenticate(
            header,
            |id| snapshot.api_keys.get(id).map(|k| &**k),
            |record| snapshot.scope(record),
        )?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The caller the interceptor attached.
pub fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("missing API key"))
}
