//! Following a job: its event stream drawn as a live progress bar on a terminal (step k/n and
//! op, epoch, loss, accuracy, ETA), or passed on as JSON lines when piped; then the summary.

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{json, Value};

use super::output::{cell, summary_table};
use super::{Client, Failure, Output, Res};

/// One server-sent event.
#[derive(Debug, Default)]
struct SseEvent {
    id: Option<String>,
    kind: String,
    data: String,
}

/// Splits a server-sent-events byte stream into events.
#[derive(Default)]
struct SseParser {
    buf: String,
    current: SseEvent,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.push_str(&String::from_utf8_lossy(bytes));
        let mut out = Vec::new();
        while let Some(at) = self.buf.find('\n') {
            let line: String = self.buf.drain(..=at).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                let ev = std::mem::take(&mut self.current);
                if !ev.data.is_empty() || !ev.kind.is_empty() {
                    out.push(ev);
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => self.current.id = Some(value.to_string()),
                "event" => self.current.kind = value.to_string(),
                "data" => {
                    if !self.current.data.is_empty() {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                }
                _ => {}
            }
        }
        out
    }
}

/// What the bar shows.
#[derive(Default)]
struct Status {
    steps: usize,
    step: usize,
    op: String,
    message: String,
    epoch: Option<String>,
}

impl Status {
    fn line(&self) -> String {
        let mut s = format!(
            "step {}/{} {}",
            (self.step + 1).min(self.steps.max(1)),
            self.steps.max(1),
            self.op
        );
        if !self.message.is_empty() {
            s.push_str(&format!(" · {}", self.message));
        }
        if let Some(e) = &self.epoch {
            s.push_str(&format!(" · {e}"));
        }
        s
    }
}

fn epoch_text(d: &Value) -> String {
    let mut s = format!("epoch {}", d["epoch"]);
    for (k, label) in [
        ("train_loss", "loss"),
        ("val_loss", "val loss"),
        ("val_accuracy", "val acc"),
        ("train_accuracy", "acc"),
    ] {
        if let Some(v) = d.get(k).filter(|v| !v.is_null()) {
            s.push_str(&format!(" {label} {}", cell(v)));
        }
    }
    s
}

/// Follows job `id` to its end; `Ok` when it succeeded.
pub(super) async fn follow(
    c: &Client,
    id: &str,
    out: &Output,
    tty: bool,
    cancel_on_interrupt: bool,
) -> Res<()> {
    let job = c.get(&format!("/v1/jobs/{id}")).await?;
    let live = tty && !out.is_json();
    let bar = if live {
        let bar =
            ProgressBar::with_draw_target(Some(1000), indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("[{bar:30}] {percent:>3}% {msg} (ETA {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut status = Status {
        steps: job["steps"].as_array().map_or(1, Vec::len),
        ..Status::default()
    };
    let mut interrupted = false;
    let mut cancel_sent = false;
    'outer: loop {
        let res = c.events(id).await?;
        let mut stream = res.bytes_stream();
        let mut parser = SseParser::default();
        loop {
            let chunk = tokio::select! {
                chunk = stream.next() => chunk,
                _ = tokio::signal::ctrl_c(), if !cancel_sent => {
                    if cancel_on_interrupt {
                        cancel_sent = true;
                        bar.println("interrupted: asking the server to cancel the job");
                        c.json(c.req(Method::POST, &format!("/v1/jobs/{id}/cancel"))).await?;
                        continue;
                    }
                    interrupted = true;
                    break 'outer;
                }
            };
            let Some(chunk) = chunk else {
                break;
            };
            let chunk = chunk.map_err(|e| Failure::Server(format!("event stream: {e}")))?;
            for ev in parser.push(&chunk) {
                let data: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
                if !live {
                    out.line(&json!({"event": ev.kind, "id": ev.id, "data": data}));
                    continue;
                }
                match ev.kind.as_str() {
                    "progress" => {
                        status.step = data["step"].as_u64().unwrap_or(0) as usize;
                        status.op = data["op"].as_str().unwrap_or("").to_string();
                        status.message = data["message"].as_str().unwrap_or("").to_string();
                        if let Some(f) = data["fraction"].as_f64() {
                            bar.set_position((f * 1000.0) as u64);
                        }
                    }
                    // Per-epoch figures (the job's final metrics document comes as `metrics` too).
                    "metrics" if data.get("epoch").is_some() => {
                        status.epoch = Some(epoch_text(&data))
                    }
                    "log" if data["level"] != "debug" => {
                        if let Some(m) = data["message"].as_str() {
                            if m.starts_with("step ") {
                                status.epoch = None;
                            }
                            bar.println(format!("  {m}"));
                        }
                    }
                    "state" => {
                        let s = data["state"].as_str().unwrap_or("");
                        status.message = s.to_string();
                        if s == "succeeded" {
                            bar.set_position(1000);
                        }
                    }
                    _ => {}
                }
                bar.set_message(status.line());
            }
        }
        // The stream ended: the job finished, or the server went away (then reconnect).
        let job = c.get(&format!("/v1/jobs/{id}")).await?;
        let state = job["state"].as_str().unwrap_or("");
        if matches!(state, "succeeded" | "failed" | "cancelled") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    bar.finish_and_clear();
    if interrupted {
        eprintln!(
            "stopped following job {id}; it keeps running (`whittle jobs watch {id}`; \
             --cancel-on-interrupt cancels it)"
        );
        return Err(Failure::Interrupted);
    }
    let job = c.get(&format!("/v1/jobs/{id}")).await?;
    let state = job["state"].as_str().unwrap_or("").to_string();
    if live {
        eprintln!("job {id} {state}");
        if state == "succeeded" {
            let m = c.get(&format!("/v1/jobs/{id}/metrics")).await?;
            println!("{}", summary_table(&m));
            if let Some(mid) = job["result"]["model_id"].as_str() {
                println!("output model: {mid}");
            }
        }
    } else {
        out.line(&json!({"event": "done", "data": job}));
    }
    match state.as_str() {
        "succeeded" => Ok(()),
        _ => Err(Failure::Job(format!(
            "job {id} {state}: {}",
            job["error"]["message"].as_str().unwrap_or("")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.push(b"id: 1\nevent: state\ndata: {\"state\":").is_empty());
        let evs = p.push(b"\"queued\"}\n\n: keep-alive\n\nid: 2\nevent: log\ndata: a\ndata: b\n\n");
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].id.as_deref(), Some("1"));
        assert_eq!(evs[0].kind, "state");
        assert_eq!(evs[0].data, "{\"state\":\"queued\"}");
        assert_eq!(evs[1].data, "a\nb");
    }
}
