//! wgtwo-operator: keeps wgtwo OAuth 2.0 access tokens alive in Kubernetes Secrets.

pub mod agent;
pub mod api;
pub mod authorize;
pub mod commands;
pub mod controller;
pub mod kubeapi;
pub mod leader;
pub mod metrics;
pub mod oauth;
pub mod operator;
pub mod server;
