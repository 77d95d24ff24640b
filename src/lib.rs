//! Whittle: a service that makes neural networks smaller and cheaper.
//!
//! Layers, in the one direction data flows: [`http`] → [`db`] / [`store`] / [`queue`] →
//! [`compress`]. `compress` is pure, synchronous compute; it knows nothing of HTTP, SQL or tokio.

pub mod app;
pub mod client;
pub mod codes;
pub mod compress;
pub mod config;
pub mod db;
pub mod http;
pub mod ids;
pub mod queue;
pub mod spec;
pub mod store;
pub mod telemetry;
