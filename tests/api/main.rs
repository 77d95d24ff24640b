//! The one integration-test binary (each extra binary would link everything again).
//! Tests drive the router in-process and the worker one job at a time: no sockets, no sleeps.

mod helpers;

/// Run each named `async fn(TestApp)` on SQLite and, when `WHITTLE_TEST_DATABASE_URL` is set
/// (always in CI), on Postgres: one contract, two backends.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(crate::helpers::TestApp::sqlite().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    if let Some(t) = crate::helpers::TestApp::postgres().await {
                        super::$name(t).await
                    }
                }
            )*
        }
    };
}

mod access;
mod calibrated;
mod cli;
mod compression;
mod datasets;
mod engine;
mod folders;
mod golden;
mod jobs;
mod lifecycle;
mod models;
mod objects;
mod openapi;
mod ops;
mod queue;
mod transformers;
mod webhooks;
