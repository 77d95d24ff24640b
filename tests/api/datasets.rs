//! Datasets: safetensors, CSV and IDX uploads, their summaries, refusals.

use std::collections::BTreeMap;
use std::io::Write;

use serde_json::json;
use whittle::compress::formats::safetensors::{self as tensors, Dtype, TensorSpec};

use crate::helpers::*;

fn xy_safetensors(samples: usize) -> Vec<u8> {
    let x: Vec<f32> = values(samples * 6, 3);
    let y: Vec<i64> = (0..samples as i64).map(|i| i % 4).collect();
    let xb = tensors::encode_f32(&x);
    let yb = tensors::encode_i64(&y);
    tensors::serialize(
        &BTreeMap::new(),
        &[
            (
                TensorSpec::new("x", Dtype::F32, vec![samples, 2, 3]),
                xb.as_slice(),
            ),
            (
                TensorSpec::new("y", Dtype::I64, vec![samples]),
                yb.as_slice(),
            ),
        ],
    )
    .unwrap()
}

async fn safetensors_dataset_reports_samples_shape_and_classes(t: TestApp) {
    let res = t
        .post_bytes(
            "/v1/datasets?name=toy",
            "application/octet-stream",
            xy_safetensors(10),
        )
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    let d = res.json();
    assert_eq!(d["name"], "toy");
    assert_eq!(d["format"], "safetensors");
    assert_eq!(d["samples"], 10);
    assert_eq!(d["feature_shape"], json!([2, 3]));
    assert_eq!(d["num_classes"], 4);
    let id = d["id"].as_str().unwrap();
    assert_eq!(
        res.header("location"),
        Some(format!("/v1/datasets/{id}").as_str())
    );
    assert_eq!(t.get(&format!("/v1/datasets/{id}")).await.json(), d);
    assert_eq!(t.get("/v1/datasets").await.json()["items"][0], d);
    assert_eq!(t.delete(&format!("/v1/datasets/{id}")).await.status, 204);
    t.get(&format!("/v1/datasets/{id}"))
        .await
        .assert_problem(404, "dataset_not_found");
}

#[tokio::test]
async fn csv_dataset_with_header_and_label_column() {
    let t = TestApp::sqlite().await;
    let csv = "a,b,label,c\n0.5,1,2,3\n1.5,2,0,4\n2.5,3,1,5\n";
    let res = t
        .post_multipart(
            "/v1/datasets",
            &[
                Part {
                    name: "format",
                    filename: None,
                    bytes: b"csv".to_vec(),
                },
                Part {
                    name: "label_column",
                    filename: None,
                    bytes: b"label".to_vec(),
                },
                Part {
                    name: "file",
                    filename: Some("d.csv"),
                    bytes: csv.as_bytes().to_vec(),
                },
            ],
        )
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    let d = res.json();
    assert_eq!(d["format"], "csv");
    assert_eq!(d["samples"], 3);
    assert_eq!(d["feature_shape"], json!([3]));
    assert_eq!(d["num_classes"], 3);

    // Ragged rows are refused with the line number.
    let res = t
        .post_bytes(
            "/v1/datasets?format=csv",
            "application/octet-stream",
            b"1,2,0\n3,4\n".to_vec(),
        )
        .await;
    let body = res.assert_problem(422, "invalid_dataset");
    assert!(body["detail"].as_str().unwrap().contains('2'), "{body}");
}

fn idx_images(n: usize) -> Vec<u8> {
    let mut out = vec![0, 0, 8, 3];
    for d in [n as u32, 28, 28] {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend((0..n * 784).map(|i| (i % 251) as u8));
    out
}

fn idx_labels(n: usize) -> Vec<u8> {
    let mut out = vec![0, 0, 8, 1];
    out.extend_from_slice(&(n as u32).to_be_bytes());
    out.extend((0..n).map(|i| (i % 10) as u8));
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

async fn mnist_idx_pair_gzipped_or_raw(t: TestApp) {
    let res = t
        .post_multipart(
            "/v1/datasets",
            &[
                Part {
                    name: "images",
                    filename: Some("train-images-idx3-ubyte.gz"),
                    bytes: gzip(&idx_images(20)),
                },
                Part {
                    name: "labels",
                    filename: Some("train-labels-idx1-ubyte"),
                    bytes: idx_labels(20),
                },
            ],
        )
        .await;
    assert_eq!(res.status, 201, "{}", res.text());
    let d = res.json();
    assert_eq!(d["format"], "idx");
    assert_eq!(d["samples"], 20);
    assert_eq!(d["num_classes"], 10);
    assert_eq!(d["feature_shape"], json!([1, 28, 28]));

    // Counts that disagree are refused.
    t.post_multipart(
        "/v1/datasets",
        &[
            Part {
                name: "images",
                filename: Some("i"),
                bytes: idx_images(20),
            },
            Part {
                name: "labels",
                filename: Some("l"),
                bytes: idx_labels(19),
            },
        ],
    )
    .await
    .assert_problem(422, "invalid_dataset");
    assert_eq!(
        t.get("/v1/datasets").await.json()["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn dataset_refusals() {
    let t = TestApp::sqlite().await;
    t.post_bytes(
        "/v1/datasets",
        "application/octet-stream",
        b"garbage".to_vec(),
    )
    .await
    .assert_problem(422, "invalid_safetensors");
    t.post_bytes(
        "/v1/datasets?format=parquet",
        "application/octet-stream",
        b"x".to_vec(),
    )
    .await
    .assert_problem(422, "invalid_dataset_format");
    t.post_multipart(
        "/v1/datasets",
        &[Part {
            name: "images",
            filename: Some("i"),
            bytes: idx_images(2),
        }],
    )
    .await
    .assert_problem(422, "missing_part");
    t.post_bytes(
        "/v1/datasets?format=idx",
        "application/octet-stream",
        idx_images(2),
    )
    .await
    .assert_problem(422, "missing_part");
    t.get("/v1/datasets/0190d4a0-0000-7000-8000-000000000000")
        .await
        .assert_problem(404, "dataset_not_found");
    assert_eq!(t.get("/v1/datasets").await.json()["items"], json!([]));
}

on_both_backends!(
    safetensors_dataset_reports_samples_shape_and_classes,
    mnist_idx_pair_gzipped_or_raw,
);
