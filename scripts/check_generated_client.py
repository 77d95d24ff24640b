"""A Python client generated from the served OpenAPI document drives a real server.

openapi-python-client (PyPI) generates a client from GET /openapi.yaml; this script then uses
only that client's typed models and functions: it creates a model from an architecture,
uploads a labelled dataset as a file, runs one job of every op (and of every quantize method),
each step built from its own generated class, then a multi-step job with an evaluation and a
webhook receiver, and downloads its output model. Exits non-zero on any failure.

    python scripts/check_generated_client.py http://127.0.0.1:8080 [API_KEY]
(run by scripts/check_openapi_clients.sh, which installs the pinned tools and starts a server)
"""
import importlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

url = sys.argv[1].rstrip("/")
key = sys.argv[2] if len(sys.argv) > 2 else None
# With the server's webhook secret, the job also names a receiver here, and every delivery is
# checked with the Standard Webhooks reference library (PyPI `standardwebhooks`).
webhook_secret = sys.argv[3] if len(sys.argv) > 3 else None
work = tempfile.mkdtemp(prefix="whittle-client-")
spec = os.path.join(work, "openapi.yaml")
with urllib.request.urlopen(f"{url}/openapi.yaml") as r, open(spec, "wb") as f:
    f.write(r.read())
gen = subprocess.run(
    [os.path.join(os.path.dirname(sys.executable), "openapi-python-client"), "generate",
     "--path", spec, "--meta", "none", "--output-path", os.path.join(work, "whittle_client")],
    capture_output=True, text=True)
if gen.returncode != 0:
    sys.exit(f"generation failed:\n{gen.stdout}\n{gen.stderr}")
# Warnings the generator may print are only about alternative body types it cannot express
# (tar, csv, plain text, jsonl, yaml); every schema must survive.
dropped = [l for l in gen.stdout.splitlines() if "Unable to process schema" in l or "removal of" in l]
if dropped:
    sys.exit("schemas dropped by the generator:\n" + gen.stdout)
sys.path.insert(0, work)
wc = importlib.import_module("whittle_client")
M = importlib.import_module("whittle_client.models")
types = importlib.import_module("whittle_client.types")
api = lambda mod: importlib.import_module(f"whittle_client.api.{mod}")

client = (wc.AuthenticatedClient(base_url=url, token=key) if key else wc.Client(base_url=url))
client = client.with_timeout(__import__("httpx").Timeout(60.0))


def ok(result, kind):
    if not isinstance(result, kind):
        sys.exit(f"expected {kind.__name__}, got {result!r}")
    return result


# A 32 → 64 → 10 MLP (rows of 32 and 64: every GGUF block type fits).
arch = M.Architecture(kind="sequential", input_shape=[32], layers=[
    M.LinearLayer(type_="linear", name="fc1", in_features=32, out_features=64),
    M.PlainLayer(type_=M.PlainLayerType.RELU),
    M.LinearLayer(type_="linear", name="fc2", in_features=64, out_features=10),
])
model = ok(api("models.upload_model").sync(
    client=client, body=M.ModelFromArchitecture(architecture=arch, name="generated-client")), M.Model)

# A labelled dataset (safetensors with x: f32 [n, 32], y: i64 [n]) uploaded as a File.
n = 200
xs = [((i * 7 + j * 13) % 17) / 17.0 + (i % 10) * 0.1 for i in range(n) for j in range(32)]
ys = [i % 10 for i in range(n)]
header = {"x": {"dtype": "F32", "shape": [n, 32], "data_offsets": [0, 4 * n * 32]},
          "y": {"dtype": "I64", "shape": [n], "data_offsets": [4 * n * 32, 4 * n * 32 + 8 * n]}}
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
data = struct.pack("<Q", len(h)) + h + struct.pack(f"<{n * 32}f", *xs) + struct.pack(f"<{n}q", *ys)
import io
dataset = ok(api("datasets.upload_dataset").sync(
    client=client, body=types.File(payload=io.BytesIO(data), file_name="toy.safetensors",
                                   mime_type="application/octet-stream"), name="toy"), M.Dataset)
ds = dataset.id

steps = {
    "prune": M.PruneStep(op="prune", sparsity=0.5),
    "quantize float": M.QuantizeFloatStep(op="quantize", method="float", dtype=M.QuantizeFloatStepDtype.F16),
    "quantize uniform": M.QuantizeUniformStep(op="quantize", method="uniform", bits=8),
    "quantize kmeans": M.QuantizeKmeansStep(op="quantize", method="kmeans", clusters=16),
    "quantize log2": M.QuantizeLog2Step(op="quantize", method="log2", bits=4),
    "quantize nf4": M.QuantizeNf4Step(op="quantize", method="nf4", group_size=32),
    "quantize gguf": M.QuantizeGgufStep(op="quantize", method="gguf", type_=M.QuantizeGgufStepType.Q8_0),
    "finetune": M.FinetuneStep(op="finetune", dataset_id=ds, epochs=1),
    "distill": M.DistillStep(op="distill", dataset_id=ds, epochs=1, student=M.StudentArchitecture(
        architecture=M.Architecture(kind="sequential", input_shape=[32], layers=[
            M.LinearLayer(type_="linear", name="fc1", in_features=32, out_features=16),
            M.PlainLayer(type_=M.PlainLayerType.RELU),
            M.LinearLayer(type_="linear", name="fc2", in_features=16, out_features=10)]))),
    "evaluate": M.EvaluateStep(op="evaluate", dataset_id=ds),
    "quantize gptq": M.QuantizeGptqStep(op="quantize", method="gptq", bits=4, group_size=16,
                                        calibration=M.Calibration(dataset_id=ds, samples=64)),
    "quantize awq": M.QuantizeAwqStep(op="quantize", method="awq", bits=4, group_size=16,
                                      calibration=M.Calibration(dataset_id=ds, samples=64)),
    "quantize hqq": M.QuantizeHqqStep(op="quantize", method="hqq", bits=4, group_size=16),
    "prune wanda": M.CalibratedPruneStep(op="prune", method=M.CalibratedPruneStepMethod.WANDA, sparsity=0.5,
                                         calibration=M.Calibration(dataset_id=ds, samples=64)),
}
create = api("jobs.create_job")
get = api("jobs.get_job")


def wait(job):
    deadline = time.time() + 120
    while job.state not in (M.JobState.SUCCEEDED, M.JobState.FAILED, M.JobState.CANCELLED):
        if time.time() > deadline:
            sys.exit(f"job {job.id} still {job.state} after 120 s")
        time.sleep(0.3)
        job = ok(get.sync(client=client, id=str(job.id)), M.Job)
    if job.state != M.JobState.SUCCEEDED:
        sys.exit(f"job {job.id} ended {job.state}: {job.error}")
    return job


# One job of each op (and of each quantize method), each step built from its own class: the
# plan first (dry run), then the job itself, run to success by the server's worker.
for name, step in steps.items():
    plan = create.sync(client=client, body=M.JobSpec(model_id=model.id, steps=[step]), dry_run=True)
    ok(plan, M.DryRunPlan)
    job = wait(ok(create.sync(client=client, body=M.JobSpec(model_id=model.id, steps=[step])), M.Job))
    assert type(job.steps[0]).__name__ == type(step).__name__, (job.steps[0], step)
    print(f"ok   {name}: planned, then job {job.id} succeeded")

received = []
if webhook_secret:
    import http.server
    import threading

    class Receiver(http.server.BaseHTTPRequestHandler):
        """Refuses the first two deliveries (500), accepts the rest."""

        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append((dict(self.headers), body))
            self.send_response(500 if len(received) <= 2 else 204)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hook_server.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hook_server.server_address[1]}/hook"
else:
    hook_url = types.UNSET

spec = M.JobSpec(model_id=model.id, steps=[steps["finetune"], steps["prune"], steps["quantize uniform"]],
                 eval_=M.EvalSpec(dataset_id=ds), webhook_url=hook_url)
job = wait(ok(create.sync(client=client, body=spec, idempotency_key="generated-client-1"), M.Job))
kinds = [type(s).__name__ for s in job.steps]
assert kinds == ["FinetuneStep", "PruneStep", "QuantizeUniformStep"], kinds
metrics = api("jobs.job_metrics").sync(client=client, id=str(job.id))
ok(metrics, M.Metrics)
content = api("models.download_model").sync_detailed(client=client, id=str(job.result.model_id))
assert content.status_code == 200 and content.content[:8] != b"", content.status_code
print(f"ok   job {job.id} ({' → '.join(kinds)}) succeeded; output model {job.result.model_id} "
      f"downloaded ({len(content.content)} bytes)")
if webhook_secret:
    from standardwebhooks import Webhook
    deadline = time.time() + 60
    deliveries = api("jobs.job_deliveries")
    while True:
        d = ok(deliveries.sync(client=client, id=str(job.id)), M.DeliveryList)
        if all(i.state == M.DeliveryState.DELIVERED for i in d.items) and len(d.items) == 2:
            break
        if time.time() > deadline:
            sys.exit(f"deliveries not done after 60 s: {d.to_dict()}")
        time.sleep(0.5)
    wh = Webhook(webhook_secret)
    events = {}
    for headers, body in received:
        payload = wh.verify(body, {k.lower(): v for k, v in headers.items()})
        events.setdefault(payload["type"], set()).add(headers["webhook-id"])
    assert set(events) == {"job.started", "job.succeeded"}, events
    assert all(len(ids) == 1 for ids in events.values()), events
    print(f"ok   webhooks: {len(received)} deliveries ({sum(1 for i in d.items for r in i.responses if r.status == 500)} refused, "
          f"then accepted), every signature verified by standardwebhooks")
print("generated client ok")
