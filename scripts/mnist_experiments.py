#!/usr/bin/env python3
"""Reproduce the model-engine figures on real data, through the running service's API only.

  scripts/fetch_data.sh mnist fashion          # data, sha256-pinned, into target/fixtures/
  cargo run --release &                         # the service (or point --url elsewhere)
  python3 scripts/mnist_experiments.py lenet    # LeNet-300-100 from scratch on MNIST
  python3 scripts/mnist_experiments.py transfer # MNIST features -> Fashion-MNIST, 1,000 labels
  python3 scripts/mnist_experiments.py han      # Han et al. 2015: iterative pruning of LeNet-300-100
  python3 scripts/mnist_experiments.py deep     # Deep Compression: prune -> finetune -> kmeans, packed
  python3 scripts/mnist_experiments.py quant    # int8 / int4 PTQ vs QAT / kmeans-32 on LeNet-300-100 and LeNet-5
  python3 scripts/mnist_experiments.py structured  # LeNet-5, 50% of conv channels removed
  python3 scripts/mnist_experiments.py hinton   # Hinton et al. 2015: distillation with a T sweep

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


def mnist(args):
    train = upload_idx(args.url, "mnist-train", *read("mnist", "train"))
    test = upload_idx(args.url, "mnist-test", *read("mnist", "t10k"))
    return train["id"], test["id"]


def pretrained(args, arch, train, test, epochs, name, **extra):
    """A network trained from scratch (the unpruned / float reference) and its test figures."""
    model = call(f"{args.url}/v1/models", "POST", {"name": name, "architecture": arch, "init": {"seed": args.seed}})
    job, m, seconds = run_job(args.url, {
        "model_id": model["id"], "seed": args.seed, "eval": {"dataset_id": test, "batch_size": 1000},
        "steps": [train_step(train, epochs, **extra)]})
    return job["result"]["model_id"], m["final"], seconds


def err(acc):
    return round(100 * (1 - acc), 2)


# Han et al. 2015, Table 4 (LeNet-300-100): weights kept per layer.
HAN_KEPT = {"fc1.weight": 0.08, "fc2.weight": 0.09, "fc3.weight": 0.26}


def optimizer(name, lr, weight_decay, momentum=0.9):
    opt = {"name": name, "lr": lr, "weight_decay": weight_decay}
    if name == "sgd":
        opt["momentum"] = momentum
    return opt


def augment_arg(args):
    """`--augment N`: random shifts of up to N pixels in every training step (Hinton et al.'s jitter)."""
    return {"augment": {"translate": args.augment}} if args.augment else {}


def prune_step(train, iterations, epochs_per_round, scope="layer", lr=5e-4, weight_decay=0.0,
               opt="adamw", kind="polynomial", kept=None, splicing=None, augment=None):
    step = {"op": "prune", "method": "magnitude", "scope": scope,
            "schedule": {"kind": kind, "iterations": iterations,
                         "finetune": {"dataset_id": train, "epochs": epochs_per_round, "batch_size": 128,
                                      "optimizer": optimizer(opt, lr, weight_decay),
                                      "lr_schedule": {"kind": "cosine"}, **(augment or {})}}}
    if splicing:
        step["schedule"]["splicing"] = splicing
    if kind == "polynomial":
        step["schedule"]["power"] = 3
    if scope == "layer":
        step["sparsity"] = 0.92
        step["layers"] = {k: round(1 - v, 4) for k, v in (kept or HAN_KEPT).items()}
    else:
        step["sparsity"] = 0.92
    return step


def distill_step(args, train, student_id):
    """The unpruned model (the job's) teaching its pruned copy, zeros held."""
    opt = args.distill_optimizer or args.retrain_optimizer
    lr = args.distill_lr or args.final_lr or args.retrain_lr
    wd = args.retrain_wd if opt == args.retrain_optimizer else 0.0
    return {"op": "distill", "student": {"model_id": student_id}, "keep_sparsity": True,
            "dataset_id": train, "epochs": args.distill_epochs, "batch_size": 128,
            "optimizer": optimizer(opt, lr, wd), "lr_schedule": {"kind": "cosine"},
            "temperature": args.temperature, "alpha": args.alpha, **augment_arg(args)}


def splicing_arg(args):
    """`--splicing 0.75 [--splice-margin 0.1]`: Dynamic Network Surgery's splicing in every round."""
    if args.splicing is None:
        return None
    return {"until": args.splicing, "margin": args.splice_margin}


def kept_arg(args):
    """`--kept 0.045,0.07,0.25`: the fractions of fc1, fc2, fc3 kept (default Han et al.'s)."""
    if not args.kept:
        return None
    return dict(zip(["fc1.weight", "fc2.weight", "fc3.weight"], (float(k) for k in args.kept.split(","))))


def base_lenet(args, train, test):
    """The unpruned LeNet-300-100: `--base-id` (evaluated again), or trained now."""
    if args.base_id:
        _, m, _ = run_job(args.url, {"model_id": args.base_id, "steps": [{"op": "evaluate", "dataset_id": test, "batch_size": 1000}]})
        return args.base_id, m["steps"][0]["summary"], 0.0
    return pretrained(args, LENET, train, test, args.epochs, "lenet-300-100", **augment_arg(args))


def han(args):
    train, test = mnist(args)
    base, base_final, base_s = base_lenet(args, train, test)
    steps = [prune_step(train, args.iterations, args.round_epochs, args.scope, args.retrain_lr, args.retrain_wd,
                        args.retrain_optimizer, kept=kept_arg(args), splicing=splicing_arg(args),
                        augment=augment_arg(args))]
    if args.final_epochs:
        # One more round at the final sparsity (the mask does not change), retrained longer.
        steps.append(prune_step(train, 1, args.final_epochs, args.scope, args.final_lr or args.retrain_lr,
                                args.retrain_wd, args.retrain_optimizer, kind="constant", kept=kept_arg(args),
                                augment=augment_arg(args)))
    job, m, seconds = run_job(args.url, {
        "model_id": base, "seed": args.seed, "eval": {"dataset_id": test, "batch_size": 1000}, "steps": steps})
    rounds = [r for s in m["steps"] for r in s["summary"]["iterations"]]
    pruned_error = err(m["final"]["accuracy"])
    distilled = None
    if args.distill_epochs:
        # Retrain the pruned network once more on the unpruned one's soft targets, zeros held.
        d_job, d_m, d_s = run_job(args.url, {
            "model_id": base, "seed": args.seed, "eval": {"dataset_id": test, "batch_size": 1000},
            "steps": [distill_step(args, train, job["result"]["model_id"])]})
        distilled = {"test_error_percent": err(d_m["final"]["accuracy"]), "epochs": args.distill_epochs,
                     "temperature": args.temperature, "alpha": args.alpha,
                     "zero_weights_held": d_m["steps"][0]["summary"]["keep_sparsity"]["zero_weights_held"],
                     "seconds": round(d_s, 1), "job_id": d_job["id"], "model_id": d_job["result"]["model_id"]}
    step = m["steps"][-1]
    layers = {l["tensor"]: round(1 - l["sparsity"], 4) for l in step["layers"]}
    total = sum(l["numel"] for l in step["layers"])
    nonzero = sum(l["nonzero"] for l in step["layers"])
    return {"experiment": "Han et al. 2015: LeNet-300-100 iterative magnitude pruning + retraining on MNIST",
            "unpruned_test_error_percent": err(base_final["accuracy"]),
            "pruned_test_error_percent": distilled["test_error_percent"] if distilled else pruned_error,
            "pruned_before_distillation_test_error_percent": pruned_error if distilled else None,
            "distillation": distilled,
            "paper": {"unpruned": 1.64, "pruned": 1.59, "kept": HAN_KEPT},
            "weights_kept": round(nonzero / total, 4), "compression_x": round(total / nonzero, 1),
            "kept_per_layer": layers, "scope": args.scope,
            "rounds": [{k: r.get(k) for k in ("iteration", "target_sparsity", "sparsity", "accuracy_after_pruning", "accuracy_after_retraining", "splicing")} for r in rounds],
            "pretrain_epochs": args.epochs, "iterations": args.iterations, "epochs_per_round": args.round_epochs,
            "final_epochs": args.final_epochs, "splicing": splicing_arg(args), "augment_translate": args.augment,
            "retrain_optimizer": optimizer(args.retrain_optimizer, args.retrain_lr, args.retrain_wd),
            "seconds": {"pretrain": round(base_s, 1), "prune_job": round(seconds, 1)}, "job_id": job["id"],
            "pruned_model_id": job["result"]["model_id"], "unpruned_model_id": base}


def deep(args):
    train, test = mnist(args)
    base, base_final, _ = base_lenet(args, train, test)
    size_in = call(f"{args.url}/v1/models/{base}")["size_bytes"]
    kmeans_step = {"op": "quantize", "method": "kmeans", "clusters": args.clusters, "init": "linear",
                   "format": "packed", "entropy": args.entropy, "include": ["fc*.weight"]}
    if args.qat_epochs:
        # Deep Compression §3.3: fine-tune the shared centroids (pruned weights stay zero).
        kmeans_step["qat"] = {"dataset_id": train, "epochs": args.qat_epochs, "batch_size": 128,
                              "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0},
                              "lr_schedule": {"kind": "cosine"}, **augment_arg(args)}
    prune = prune_step(train, args.iterations, args.round_epochs, lr=args.retrain_lr, weight_decay=args.retrain_wd,
                       opt=args.retrain_optimizer, kept=kept_arg(args), splicing=splicing_arg(args),
                       augment=augment_arg(args))
    distilled = None
    if args.pruned_id and not args.distill_epochs:
        sys.exit("--pruned-id needs --distill-epochs (the dense network teaches the pruned one before k-means)")
    if args.distill_epochs:
        # Two jobs: the pruning (or `--pruned-id`, han's pruned_model_id: the same pruning job
        # run earlier), then the unpruned network teaching its pruned copy (zeros held) before
        # k-means; the second job's model is the teacher, its output the student.
        if args.pruned_id:
            pruned, p_s, pruned_error, pruned_job = args.pruned_id, 0.0, None, None
        else:
            p_job, p_m, p_s = run_job(args.url, {
                "model_id": base, "seed": args.seed, "eval": {"dataset_id": test, "batch_size": 1000}, "steps": [prune]})
            pruned, pruned_job = p_job["result"]["model_id"], p_job["id"]
            pruned_error = err(p_m["steps"][0]["summary"]["iterations"][-1]["accuracy_after_retraining"])
        job, m, seconds = run_job(args.url, {
            "model_id": base, "seed": args.seed, "eval": {"dataset_id": test, "batch_size": 1000},
            "steps": [distill_step(args, train, pruned), kmeans_step]})
        distilled = {"test_error_percent": err(m["steps"][0]["summary"]["student_accuracy"]),
                     "pruned_job_id": pruned_job, "pruned_model_id": pruned, "seconds": round(seconds, 1)}
        seconds += p_s
        total = sum(l["in_features"] * l["out_features"] for l in LENET["layers"] if l["type"] == "linear")
        nonzero = total - m["steps"][0]["summary"]["keep_sparsity"]["zero_weights_held"]
    else:
        job, m, seconds = run_job(args.url, {
            "model_id": base, "seed": args.seed, "eval": {"dataset_id": test, "batch_size": 1000},
            "steps": [prune, kmeans_step]})
        pruned_layers = m["steps"][0]["layers"]
        pruned_error = err(m["steps"][0]["summary"]["iterations"][-1]["accuracy_after_retraining"])
        total = sum(l["numel"] for l in pruned_layers)
        nonzero = sum(l["nonzero"] for l in pruned_layers)
    final = m["final"]
    quant = m["steps"][-1]
    return {"experiment": "Deep Compression pipeline on MNIST LeNet-300-100: prune (iterative) -> kmeans-32 (5 bits), packed",
            "float_model_bytes": size_in, "float_test_error_percent": err(base_final["accuracy"]),
            "packed_bytes": final.get("packed_size_bytes"), "compression_x": round(size_in / final["packed_size_bytes"], 1),
            "test_error_percent": err(final["accuracy"]),
            "paper": {"float_kb": 1070, "compressed_kb": 27, "x": 40, "x_without_huffman": "~32", "error_percent": 1.58},
            "stages": {"pruning_x": round(total / nonzero, 2), **quant["summary"].get("stages", {})},
            "entropy": args.entropy, "clusters": args.clusters,
            "kept": round(nonzero / total, 4),
            "layers": [{k: l.get(k) for k in ("tensor", "packed_bytes", "bits_per_weight", "entropy")} for l in quant["layers"]],
            "iterations": args.iterations, "epochs_per_round": args.round_epochs,
            "centroid_finetune_epochs": args.qat_epochs,
            "retrain_optimizer": optimizer(args.retrain_optimizer, args.retrain_lr, args.retrain_wd),
            "pruned_test_error_percent": pruned_error, "augment_translate": args.augment,
            "distillation": distilled,
            "steps": [{"op": s["op"], "summary": {k: v for k, v in s["summary"].items() if k != "iterations"}} for s in m["steps"]],
            "seconds": round(seconds, 1), "job_id": job["id"]}


def quant(args):
    train, test = mnist(args)
    out = {"experiment": "PTQ and QAT on MNIST", "results": {}}
    for name in ("lenet-300-100", "lenet5"):
        arch = ARCHS[name]
        base, base_final, _ = pretrained(args, arch, train, test, args.epochs, name)
        r = {"float_test_error_percent": err(base_final["accuracy"])}
        cases = {
            "int8 per-channel PTQ": {"op": "quantize", "method": "uniform", "bits": 8, "granularity": "per_channel"},
            "int4 per-channel PTQ": {"op": "quantize", "method": "uniform", "bits": 4, "granularity": "per_channel"},
            "int4 per-channel QAT": {"op": "quantize", "method": "uniform", "bits": 4, "granularity": "per_channel",
                                     "qat": {"dataset_id": train, "epochs": args.qat_epochs, "batch_size": 128,
                                             "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0}}},
            "int2 per-channel PTQ": {"op": "quantize", "method": "uniform", "bits": 2, "granularity": "per_channel"},
            "int2 per-channel QAT": {"op": "quantize", "method": "uniform", "bits": 2, "granularity": "per_channel",
                                     "qat": {"dataset_id": train, "epochs": args.qat_epochs, "batch_size": 128,
                                             "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0}}},
            "kmeans 32 clusters (5 bits)": {"op": "quantize", "method": "kmeans", "clusters": 32, "init": "linear"},
        }
        for label, step in cases.items():
            _, m, seconds = run_job(args.url, {"model_id": base, "seed": args.seed, "eval": {"dataset_id": test, "batch_size": 1000}, "steps": [step]})
            r[label] = {"test_error_percent": err(m["final"]["accuracy"]),
                        "drop_points": round(100 * (base_final["accuracy"] - m["final"]["accuracy"]), 2),
                        "seconds": round(seconds, 1)}
        out["results"][name] = r
    return out


def importance(args):
    """Low-bit uniform PTQ of LeNet-300-100: plain round-to-nearest, the clipping search, and the
    search weighted by importance measured on 1,024 training samples."""
    train, test = mnist(args)
    base, base_final, _ = base_lenet(args, train, test)
    out = {"experiment": "uniform PTQ of LeNet-300-100 per channel: RTN vs clipping search vs importance-weighted search",
           "float_test_error_percent": err(base_final["accuracy"]), "results": {}}
    for bits in (2, 3, 4):
        for label, extra in (("rtn", {}), ("search", {"search": True}),
                             ("importance", {"importance": {"dataset_id": train, "samples": 1024}})):
            step = {"op": "quantize", "method": "uniform", "bits": bits, "granularity": "per_channel", **extra}
            _, m, _ = run_job(args.url, {"model_id": base, "seed": args.seed,
                                         "eval": {"dataset_id": test, "batch_size": 1000}, "steps": [step]})
            out["results"][f"int{bits} {label}"] = err(m["final"]["accuracy"])
            print(f"int{bits} {label}: {out['results'][f'int{bits} {label}']}%", file=sys.stderr)
    return out


def structured(args):
    train, test = mnist(args)
    base, base_final, _ = pretrained(args, LENET5, train, test, args.epochs, "lenet5")
    job, m, seconds = run_job(args.url, {
        "model_id": base, "seed": args.seed, "eval": {"dataset_id": test, "batch_size": 1000},
        "steps": [{"op": "prune", "method": "structured", "norm": 1, "sparsity": 0.5,
                   "include": ["conv*.weight", "fc1.weight", "fc2.weight"]},
                  {"op": "evaluate", "dataset_id": test, "batch_size": 1000},
                  train_step(train, args.round_epochs, lr=5e-4)]})
    s = m["steps"][0]["summary"]
    return {"experiment": "structured pruning of LeNet-5 on MNIST: 50% of conv channels and fc neurons (L1), then a short fine-tune",
            "float_test_error_percent": err(base_final["accuracy"]),
            "after_pruning_before_finetune_error_percent": err(m["steps"][1]["summary"]["accuracy"]),
            "after_finetune_error_percent": err(m["final"]["accuracy"]),
            "tensor_bytes": [s["tensor_bytes_before"], s["tensor_bytes_after"]],
            "flops": [s["flops_before"], s["flops_after"]],
            "parameters": [s["parameters_before"], s["parameters_after"]],
            "finetune_epochs": args.round_epochs, "seconds": round(seconds, 1), "job_id": job["id"]}


def mlp(*widths, dropout=0.0):
    layers = [{"type": "flatten"}]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append({"type": "linear", "name": f"fc{i + 1}", "in_features": a, "out_features": b})
        if i + 2 < len(widths):
            layers.append({"type": "relu"})
            if dropout:
                layers.append({"type": "dropout", "p": dropout})
    return {"kind": "sequential", "input_shape": [1, 28, 28], "layers": layers}


def hinton(args):
    train, test = mnist(args)
    teacher_arch = mlp(784, 1200, 1200, 10, dropout=0.5)
    if args.teacher_id:
        teacher = args.teacher_id
        _, m, _ = run_job(args.url, {"model_id": teacher, "steps": [{"op": "evaluate", "dataset_id": test, "batch_size": 1000}]})
        teacher_final = m["steps"][0]["summary"]
    else:
        teacher, teacher_final, t_seconds = pretrained(args, teacher_arch, train, test, args.teacher_epochs,
                                                       "teacher-2x1200", **augment_arg(args))
        if args.teacher_only:
            return {"experiment": "Hinton et al. 2015 teacher: 784-1200-1200-10, dropout 0.5",
                    "teacher_test_errors": round(10000 * (1 - teacher_final["accuracy"])), "paper": 67,
                    "epochs": args.teacher_epochs, "augment_translate": args.augment,
                    "seconds": round(t_seconds, 1), "teacher_id": teacher}
    if args.transfer_samples:
        # A smaller transfer set (the first N training samples) for both the distilled student and
        # the hard-label baseline: where a teacher's soft targets carry the most information.
        train = upload_idx(args.url, f"mnist-train-{args.transfer_samples}",
                           *idx_subset(*read("mnist", "train"), 0, args.transfer_samples))["id"]
    out = {"experiment": "Hinton et al. 2015 on MNIST: teacher 784-1200-1200-10 (dropout) -> students",
           "teacher_test_errors": round(10000 * (1 - teacher_final["accuracy"])),
           "paper": {"teacher": 67, "student_alone_2x800": 146, "distilled_2x800_T20": 74},
           "epochs": args.epochs, "alpha": args.alpha, "augment_translate": args.augment,
           "student_dropout": args.student_dropout,
           "transfer_samples": args.transfer_samples or 60000, "teacher_id": teacher, "students": {}}
    for hidden in args.students.split(","):
        widths = (784, *map(int, hidden.split("x")), 10)
        name = "x".join(map(str, widths[1:-1]))
        runs = {}
        for i, temp in enumerate(args.temperatures):
            step = {"op": "distill", "dataset_id": train, "student": {"architecture": mlp(*widths, dropout=args.student_dropout)},
                    "temperature": temp, "alpha": args.alpha, "baseline": i == 0 and not args.no_baseline,
                    "epochs": args.epochs, "batch_size": 128,
                    "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0}, "lr_schedule": {"kind": "cosine"}}
            step.update(augment_arg(args))
            _, m, seconds = run_job(args.url, {"model_id": teacher, "seed": args.seed, "eval": {"dataset_id": test, "batch_size": 1000}, "steps": [step]})
            s = m["steps"][0]["summary"]
            if i == 0 and not args.no_baseline:
                runs["student alone (hard labels, same budget)"] = {"test_errors": round(10000 * (1 - s["baseline_accuracy"]))}
            runs[f"distilled T={temp}"] = {"test_errors": round(10000 * (1 - s["student_accuracy"])),
                                          "agreement_with_teacher": s["agreement_with_teacher"], "seconds": round(seconds, 1)}
        out["students"][name] = runs
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment", choices=["lenet", "transfer", "han", "deep", "quant", "structured", "hinton", "importance"])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--transfer-epochs", type=int, default=20)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="lenet-300-100", help="network of the transfer experiment")
    ap.add_argument("--iterations", type=int, default=5, help="pruning rounds")
    ap.add_argument("--round-epochs", type=int, default=3, help="retraining epochs per pruning round")
    ap.add_argument("--scope", choices=["layer", "global"], default="layer")
    ap.add_argument("--retrain-lr", type=float, default=5e-4, help="learning rate of the retraining rounds")
    ap.add_argument("--retrain-wd", type=float, default=0.0, help="weight decay of the retraining rounds")
    ap.add_argument("--retrain-optimizer", choices=["adamw", "sgd"], default="adamw",
                    help="optimizer of the retraining rounds (sgd: momentum 0.9)")
    ap.add_argument("--final-epochs", type=int, default=0,
                    help="han: one more retraining round at the final sparsity, this many epochs")
    ap.add_argument("--final-lr", type=float, help="han: learning rate of that round (default: --retrain-lr)")
    ap.add_argument("--kept", help="han/deep: fractions of fc1,fc2,fc3 kept, e.g. 0.045,0.07,0.25 (default 0.08,0.09,0.26)")
    ap.add_argument("--splicing", type=float, metavar="UNTIL",
                    help="han/deep: let pruned weights come back during the first UNTIL share of each round's epochs")
    ap.add_argument("--splice-margin", type=float, default=0.1, help="han/deep --splicing: hysteresis band")
    ap.add_argument("--clusters", type=int, default=32, help="deep: k-means codebook size")
    ap.add_argument("--entropy", choices=["none", "huffman"], default="huffman", help="deep: entropy coding of the packed file")
    ap.add_argument("--qat-epochs", type=int, default=3, help="quant: QAT epochs; deep: centroid fine-tuning epochs (0: none)")
    ap.add_argument("--distill-epochs", type=int, default=0,
                    help="han/deep: then retrain the pruned network this many epochs by distillation from the unpruned one (zeros held; deep: before k-means)")
    ap.add_argument("--distill-optimizer", choices=["adamw", "sgd"],
                    help="han/deep --distill-epochs: optimizer of the distillation (default: the retraining's)")
    ap.add_argument("--distill-lr", type=float, help="han/deep --distill-epochs: its learning rate")
    ap.add_argument("--temperature", type=float, default=4.0, help="han --distill-epochs: softmax temperature")
    ap.add_argument("--teacher-epochs", type=int, default=20)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1, 4, 8, 20])
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--teacher-id", help="reuse a trained teacher (hinton)")
    ap.add_argument("--student-dropout", type=float, default=0.0, help="hinton: dropout after each hidden layer of the students")
    ap.add_argument("--augment", type=int, default=0, help="hinton, han, deep: random shifts of up to N pixels in every training step "
                    "(the dense base when trained here, the pruning rounds, the distillation)")
    ap.add_argument("--teacher-only", action="store_true", help="hinton: train and score the teacher only")
    ap.add_argument("--no-baseline", action="store_true",
                    help="hinton: skip the student trained alone (it does not depend on --alpha or the temperatures)")
    ap.add_argument("--base-id", help="reuse a trained LeNet-300-100 (han, deep)")
    ap.add_argument("--pruned-id", help="deep --distill-epochs: reuse a pruned LeNet-300-100 (han's pruned_model_id, "
                    "pruned from --base-id) instead of pruning again")
    ap.add_argument("--transfer-samples", type=int, default=0, help="distil on the first N training samples only (hinton)")
    ap.add_argument("--students", default="800x800,30x30", help="student hidden widths (hinton)")
    args = ap.parse_args()
    experiments = {"lenet": lenet, "transfer": transfer, "han": han, "deep": deep, "quant": quant,
                   "structured": structured, "hinton": hinton, "importance": importance}
    print(json.dumps(experiments[args.experiment](args), indent=1))


if __name__ == "__main__":
    main()
