//! Blobs in an object store (`WHITTLE_BLOB_URL=s3://…`) against a real S3 endpoint (moto's
//! server, started by `.ci/run`, which exports `WHITTLE_TEST_S3_URL` and the `AWS_*`
//! variables): two processes with separate data directories share only the database and the
//! bucket, the local cache stays within its bound, and garbage collection deletes objects.
//! Skipped (with a note) when no endpoint is configured.

use std::path::Path;

use sha2::{Digest, Sha256};
use whittle::app::App;
use whittle::config::Config;

use crate::helpers::*;

fn bucket_url() -> Option<String> {
    match std::env::var("WHITTLE_TEST_S3_URL") {
        Ok(u) => Some(format!(
            "{}/{}",
            u.trim_end_matches('/'),
            uuid::Uuid::now_v7()
        )),
        Err(_) => {
            eprintln!("WHITTLE_TEST_S3_URL is not set: skipping the object-store test");
            None
        }
    }
}

fn files_under(dir: &Path) -> usize {
    walk(dir).len()
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

async fn two_processes_share_only_the_database_and_the_bucket(backend: Backend) {
    let Some(url) = bucket_url() else { return };
    let u = url.clone();
    let Some(a) = TestApp::with(backend, move |c| c.blob_url = Some(u)).await else {
        return;
    };
    // Process B: its own data directory, the same database and bucket, a one-byte cache.
    let b_dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_data_dir(b_dir.path().to_path_buf());
    config.database_url = Some(a.database_url.clone());
    config.blob_url = Some(url.clone());
    config.cache_bytes = 1;
    let b = App::open(config).await.unwrap();

    assert_eq!(a.get("/readyz").await.json()["storage"], "ok");
    let model = a.upload_model(tiny_model()).await;
    // A keeps nothing outside its cache; the blob is in the bucket.
    assert!(!a.data_dir().join("blobs").exists() || files_under(&a.data_dir().join("blobs")) == 0);
    assert_eq!(a.app.state.store.list().unwrap().len(), 1);

    let job = a.submit(f16_job(model["id"].as_str().unwrap())).await;
    // B runs it: it fetches the input from the bucket and puts the outputs there.
    let (_, state) = b.worker("b").run_next().await.unwrap().unwrap();
    assert_eq!(state, whittle::db::jobs::JobState::Succeeded);
    // B's cache keeps what was used in the last hour, even past its bound; older files go as
    // soon as something new comes in.
    let cached = walk(&b_dir.path().join("cache/blobs"));
    assert!(cached.len() >= 2, "{cached:?}");
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    for f in &cached {
        std::fs::File::options()
            .append(true)
            .open(f)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
    }
    let fresh = b.state.store.put_bytes(b"something new").unwrap();
    let left = walk(&b_dir.path().join("cache/blobs"));
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].ends_with(&fresh.sha256));
    let done = a
        .get(&format!("/v1/jobs/{}", job["id"].as_str().unwrap()))
        .await
        .json();
    let output = done["result"]["model_id"].as_str().unwrap();
    // A serves B's output from the bucket, whole and by range.
    let out = a.get(&format!("/v1/models/{output}")).await.json();
    let bytes = a.get(&format!("/v1/models/{output}/content")).await;
    assert_eq!(bytes.status, 200);
    assert_eq!(
        hex::encode(Sha256::digest(&bytes.body)),
        out["sha256"].as_str().unwrap()
    );
    let part = a
        .get_with(
            &format!("/v1/models/{output}/content"),
            &[("range", "bytes=8-15")],
        )
        .await;
    assert_eq!(part.status, 206);
    assert_eq!(&part.body[..], &bytes.body[8..16]);
    let report = done["result"]["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["kind"] == "report")
        .unwrap();
    let r = a
        .get(&format!(
            "/v1/artifacts/{}/content",
            report["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["final"].is_object());

    // Deleting the job and the output model lets garbage collection delete their objects.
    let before = a.app.state.store.list().unwrap().len();
    assert_eq!(
        a.delete(&format!("/v1/jobs/{}", job["id"].as_str().unwrap()))
            .await
            .status,
        204
    );
    assert_eq!(a.delete(&format!("/v1/models/{output}")).await.status, 204);
    let removed = a
        .app
        .collect_garbage(std::time::Duration::ZERO)
        .await
        .unwrap();
    assert!(removed >= 2, "removed {removed}");
    assert_eq!(a.app.state.store.list().unwrap().len(), before - removed);
    b.state.db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_share_only_the_database_and_the_bucket_on_postgres() {
    two_processes_share_only_the_database_and_the_bucket(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_share_only_the_database_and_the_bucket_on_sqlite() {
    two_processes_share_only_the_database_and_the_bucket(Backend::Sqlite).await
}

/// A blob above the part size goes up in parts and comes back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_blobs_go_up_in_parts() {
    let Some(url) = bucket_url() else { return };
    let t = TestApp::with(Backend::Sqlite, move |c| c.blob_url = Some(url))
        .await
        .unwrap();
    let n = 5_500_000usize; // 22 MB of f32: two parts of 16 MiB
    let data: Vec<u8> = (0..n)
        .flat_map(|i| ((i % 1000) as f32).to_le_bytes())
        .collect();
    use whittle::compress::formats::safetensors::{serialize, Dtype, TensorSpec};
    let spec = TensorSpec {
        name: "w".into(),
        dtype: Dtype::F32,
        shape: vec![n],
    };
    let bytes = serialize(&Default::default(), &[(spec, &data[..])]).unwrap();
    let model = t.upload_model(bytes.clone()).await;
    // Another process (a fresh cache) reads it back from the bucket.
    let dir = tempfile::tempdir().unwrap();
    let store = whittle::store::ObjectBlobStore::open(
        &t.app.state.config.blob_url.clone().unwrap(),
        dir.path(),
        1 << 30,
    )
    .unwrap();
    let path =
        whittle::store::BlobStore::materialize(&store, model["sha256"].as_str().unwrap()).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), bytes);
}

/// Content already in the bucket is not rewritten when stored again, but its age for garbage
/// collection restarts (a touch marker): a blob stored again minutes after it became
/// unreferenced cannot be collected between its commit and its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storing_content_again_restarts_its_age() {
    let Some(url) = bucket_url() else { return };
    let t = TestApp::with(Backend::Sqlite, move |c| c.blob_url = Some(url))
        .await
        .unwrap();
    let first = t.upload_model(tiny_model()).await;
    let sha = first["sha256"].as_str().unwrap().to_string();
    let age_of = |t: &TestApp| {
        t.app
            .state
            .store
            .list()
            .unwrap()
            .into_iter()
            .find(|(s, _)| *s == sha)
            .unwrap()
            .1
    };
    let stored = age_of(&t);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let again = std::time::SystemTime::now();
    t.upload_model(tiny_model()).await;
    let restored = age_of(&t);
    assert!(restored > stored, "{restored:?} vs {stored:?}");
    assert!(restored + std::time::Duration::from_secs(1) >= again);
    // Deleting the blob removes its marker too.
    assert_eq!(
        t.delete(&format!("/v1/models/{}", first["id"].as_str().unwrap()))
            .await
            .status,
        204
    );
    t.app.state.store.delete(&sha).await.unwrap();
    assert!(t
        .app
        .state
        .store
        .list()
        .unwrap()
        .iter()
        .all(|(s, _)| *s != sha));
}
