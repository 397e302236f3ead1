//! The Kubernetes API gateway: callers present a Vigil (OIDC) token as their bearer token; each
//! request is classified as the API server would (verb, resource, namespace, name), decided by
//! policy, recorded, and forwarded to the real API server under the gateway's own credential
//! with the caller impersonated.

pub mod config;
