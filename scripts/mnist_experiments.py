#!/usr/bin/env python3
"""Reproduce the model-engine figures on real data, through the running service's API only.

  scripts/fetch_data.sh mnist fashion          # data, sha256-pinned, into target/fixtures/
  cargo run --release &                         # the service (or point --url elsewhere)
  python3 scripts/mnist_experiments.py lenet    # LeNet-300-100 from scratch on MNIST
  python3 scripts/mnist_experiments.py transfer # MNIST features -> Fashion-MNIST, 1,000 labels

Standard library only. Prints one JSON document per experiment.
"""
import argparse
import json
import os
import struct
import sys
import time
import urllib.request
import uuid

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "fixtures")


def call(url, method="GET", body=None, content_type="application/json"):
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(req) as res:
            return json.loads(res.read() or b"null")
    except urllib.error.HTTPError as e:
        sys.exit(f"{method} {url} -> {e.code}: {e.read().decode()}")


def multipart(parts):
    boundary = uuid.uuid4().hex
    out = b""
    for name, payload in parts:
        out += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n\r\n".encode()
        out += payload + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def idx_subset(images, labels, start, count):
    """The IDX bytes of samples [start, start+count)."""
    n, rows, cols = struct.unpack(">III", images[4:16])
    count = min(count, n - start)
    img = images[:4] + struct.pack(">III", count, rows, cols) + images[16 + start * rows * cols:16 + (start + count) * rows * cols]
    lab = labels[:4] + struct.pack(">I", count) + labels[8 + start:8 + start + count]
    return img, lab


def upload_idx(url, name, images, labels):
    body, ctype = multipart([("images", images), ("labels", labels)])
    return call(f"{url}/v1/datasets?name={name}", "POST", body, ctype)


def read(set_name, split):
    d = os.path.join(ROOT, set_name)
    with open(os.path.join(d, f"{split}-images-idx3-ubyte"), "rb") as f:
        images = f.read()
    with open(os.path.join(d, f"{split}-labels-idx1-ubyte"), "rb") as f:
        labels = f.read()
    return images, labels


def run_job(url, spec):
    job = call(f"{url}/v1/jobs", "POST", spec)
    started = time.time()
    while True:
        job = call(f"{url}/v1/jobs/{job['id']}")
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(2)
    if job["state"] != "succeeded":
        sys.exit(f"job {job['id']} ended {job['state']}: {job['error']}")
    metrics = call(f"{url}/v1/jobs/{job['id']}/metrics")
    return job, metrics, time.time() - started


LENET = {"kind": "sequential", "input_shape": [1, 28, 28], "layers": [
    {"type": "flatten"},
    {"type": "linear", "name": "fc1", "in_features": 784, "out_features": 300}, {"type": "relu"},
    {"type": "linear", "name": "fc2", "in_features": 300, "out_features": 100}, {"type": "relu"},
    {"type": "linear", "name": "fc3", "in_features": 100, "out_features": 10}]}


LENET5 = {"kind": "sequential", "input_shape": [1, 28, 28], "layers": [
    {"type": "conv2d", "name": "conv1", "in_channels": 1, "out_channels": 6, "kernel_size": 5, "padding": 2},
    {"type": "relu"}, {"type": "max_pool2d", "kernel_size": 2},
    {"type": "conv2d", "name": "conv2", "in_channels": 6, "out_channels": 16, "kernel_size": 5},
    {"type": "relu"}, {"type": "max_pool2d", "kernel_size": 2},
    {"type": "flatten"},
    {"type": "linear", "name": "fc1", "in_features": 400, "out_features": 120}, {"type": "relu"},
    {"type": "linear", "name": "fc2", "in_features": 120, "out_features": 84}, {"type": "relu"},
    {"type": "linear", "name": "fc3", "in_features": 84, "out_features": 10}]}

ARCHS = {"lenet-300-100": LENET, "lenet5": LENET5}


def train_step(dataset, epochs, lr=1e-3, **extra):
    step = {"op": "finetune", "dataset_id": dataset, "epochs": epochs, "batch_size": 128,
            "optimizer": {"name": "adamw", "lr": lr, "weight_decay": 1e-4},
            "lr_schedule": {"kind": "cosine"}}
    step.update(extra)
    return step


def lenet(args):
    train = upload_idx(args.url, "mnist-train", *read("mnist", "train"))
    test = upload_idx(args.url, "mnist-test", *read("mnist", "t10k"))
    model = call(f"{args.url}/v1/models", "POST", {"name": "lenet-300-100", "architecture": LENET, "init": {"seed": args.seed}})
    job, m, seconds = run_job(args.url, {
        "model_id": model["id"], "seed": args.seed, "eval": {"dataset_id": test["id"], "batch_size": 1000},
        "steps": [train_step(train["id"], args.epochs)]})
    final = m["final"]
    return {"experiment": "LeNet-300-100 on MNIST, from scratch", "epochs": args.epochs,
            "test_error_percent": round(100 * (1 - final["accuracy"]), 2),
            "paper_reference_error_percent": 1.64, "test_loss": final["loss"],
            "epochs_curve": [{k: e[k] for k in ("epoch", "train_loss", "train_accuracy", "seconds")} for e in m["steps"][0]["epochs"]],
            "job_seconds": round(seconds, 1), "trained_model_id": job["result"]["model_id"],
            "job_id": job["id"]}


def transfer(args):
    # 1. Features from MNIST (the LeNet-300-100 body).
    mnist_train = upload_idx(args.url, "mnist-train", *read("mnist", "train"))
    arch = ARCHS[args.arch]
    base = call(f"{args.url}/v1/models", "POST", {"name": args.arch, "architecture": arch, "init": {"seed": args.seed}})
    job, _, _ = run_job(args.url, {"model_id": base["id"], "seed": args.seed, "steps": [train_step(mnist_train["id"], args.epochs)]})
    pretrained = job["result"]["model_id"]
    # 2. Fashion-MNIST with few labels, tested on its full test set.
    fimg, flab = read("fashion-mnist", "train")
    small = upload_idx(args.url, f"fashion-{args.labels}", *idx_subset(fimg, flab, 0, args.labels))
    test = upload_idx(args.url, "fashion-test", *read("fashion-mnist", "t10k"))
    budget = dict(epochs=args.transfer_epochs, batch_size=50)

    def finetune(model_id, freeze, head):
        step = {"op": "finetune", "dataset_id": small["id"], "epochs": budget["epochs"], "batch_size": budget["batch_size"],
                "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4}, "freeze": freeze}
        if head:
            step["head"] = {"layer": "fc3", "num_classes": 10}
        _, m, _ = run_job(args.url, {"model_id": model_id, "seed": args.seed, "eval": {"dataset_id": test["id"], "batch_size": 1000}, "steps": [step]})
        return m["final"]["accuracy"]

    fresh = call(f"{args.url}/v1/models", "POST", {"name": "fresh", "architecture": arch, "init": {"seed": args.seed + 1}})
    body = ["fc1.*", "fc2.*"] + (["conv*"] if args.arch == "lenet5" else [])
    results = {
        "frozen MNIST features + new head": finetune(pretrained, body, True),
        "all layers fine-tuned from MNIST weights, new head": finetune(pretrained, [], True),
        "same network from scratch": finetune(fresh["id"], [], False),
        "same head on frozen random features": finetune(fresh["id"], body, False),
    }
    return {"experiment": f"transfer MNIST -> Fashion-MNIST ({args.arch}) with {args.labels} labels, {budget}",
            "fashion_test_accuracy": results, "mnist_pretraining_epochs": args.epochs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment", choices=["lenet", "transfer"])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--transfer-epochs", type=int, default=20)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="lenet-300-100", help="network of the transfer experiment")
    args = ap.parse_args()
    print(json.dumps({"lenet": lenet, "transfer": transfer}[args.experiment](args), indent=1))


if __name__ == "__main__":
    main()
