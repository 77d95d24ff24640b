//! The one integration-test binary (each extra binary would link everything again).
//! Tests drive the router in-process and the worker one job at a time: no sockets, no sleeps.

mod helpers;

mod datasets;
mod engine;
mod jobs;
mod lifecycle;
mod models;
mod openapi;
mod ops;
mod queue;
