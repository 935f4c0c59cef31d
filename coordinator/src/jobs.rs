//! Batch jobs ("start it and come back later") in the shape of OpenAI's Files and Batches
//! APIs, durable under a state directory.
//!
//! A client uploads a JSONL of requests (`POST /v1/files`, purpose `batch`), creates a batch
//! on it (`POST /v1/batches`), polls it (`GET /v1/batches/{id}`) and downloads the output
//! file once it is `completed`. One runner task works through the batches in the order they
//! were created; each line goes through the same checks and generation as the interactive
//! endpoint, submitted to the scheduler at [`Priority::Background`], so interactive requests
//! are admitted first and batch lines never hold more than their share of places.
//!
//! On disk (`STATE/`):
//! - `lock`: held (`flock`) by the serving coordinator, so two never share a directory;
//! - `files/ID.json` (the file object) and `files/ID.data` (its bytes);
//! - `batches/ID.json`: the batch, rewritten atomically (temp file, fsync, rename) at each
//!   change of status;
//! - `batches/ID.results.jsonl`: one record per finished line, appended and fsynced as each
//!   line ends: `{"line": N, "ok": BOOL, "record": {...the output line...}}`.
//!
//! After a restart, [`Jobs::open`] reads every batch back; a batch that was running drops a
//! torn last record (a crash mid-write), counts the records, and the runner resumes with the
//! lines that have none, so finished lines are never run again. When every line has a
//! record, the output file (successes, in input order) and the error file (failures) are
//! written as files of purpose `batch_output` and the batch is `completed`.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Multipart, Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};

use crate::api::{self, ApiError, ApiState};
use crate::cluster::scheduler::Priority;
use crate::metrics::JobCounts;

/// The endpoints a batch may target.
const ENDPOINTS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];
/// Most lines in one input file (OpenAI's limit).
pub const MAX_LINES: usize = 50_000;
/// Most attempts at a line the pipeline failed (it may be recovering); then it is failed.
const MAX_ATTEMPTS: u32 = 8;

/// A failure of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the state directory {0} is in use by another shoal serve; give each its own --state-dir")]
    Locked(PathBuf),
    #[error("{path}: {msg}")]
    Corrupt { path: PathBuf, msg: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// An uploaded or produced file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileMeta {
    pub id: String,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
}

impl FileMeta {
    fn json(&self) -> Value {
        json!({
            "id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
            "filename": self.filename, "purpose": self.purpose, "status": "processed",
            "status_details": null, "expires_at": null,
        })
    }
}

/// A batch as stored in `batches/ID.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Batch {
    pub id: String,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    /// `failed` (validation), `in_progress`, `finalizing`, `completed`, `cancelling`,
    /// `cancelled`.
    pub status: String,
    pub created_at: u64,
    pub in_progress_at: Option<u64>,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    /// The end of the completion window (not enforced: batches do not expire).
    pub expires_at: u64,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    /// Validation errors: OpenAI's `{"object": "list", "data": [...]}`.
    pub errors: Option<Value>,
    pub metadata: Option<Value>,
    pub total: usize,
    #[serde(default)]
    pub completed: usize,
    #[serde(default)]
    pub failed: usize,
}

impl Batch {
    pub fn json(&self) -> Value {
        json!({
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": self.errors,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, "created_at": self.created_at,
            // Batches here run until done or cancelled: none expires.
            "in_progress_at": self.in_progress_at, "expires_at": null,
            "finalizing_at": self.finalizing_at, "completed_at": self.completed_at,
            "failed_at": self.failed_at, "expired_at": null, "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        })
    }

    /// Whether the runner still has work on it.
    pub fn active(&self) -> bool {
        matches!(self.status.as_str(), "in_progress" | "finalizing" | "cancelling")
    }
}

/// One line of an input file.
#[derive(Debug, Deserialize)]
struct InputLine {
    custom_id: String,
    method: String,
    url: String,
    body: Value,
}

/// The files and batches of one state directory.
#[derive(Debug)]
pub struct Jobs {
    dir: PathBuf,
    state: Mutex<Store>,
    /// Wakes the runner: a batch was created or cancelled.
    wake: Notify,
    _lock: File,
}

#[derive(Debug, Default)]
struct Store {
    files: BTreeMap<String, FileMeta>,
    batches: BTreeMap<String, Batch>,
    /// Line indices with a record, per batch the runner has not finished.
    done: BTreeMap<String, HashSet<usize>>,
    lines_completed: u64,
    lines_failed: u64,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A fresh id: `prefix` and 24 hex digits, unique in this process and unlikely across runs.
pub fn new_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    let a = h.finish();
    h.write_u64(a);
    format!("{prefix}{a:016x}{:08x}", h.finish() as u32)
}

/// Whether `id` can name a file on disk (ids come from URLs).
fn safe_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Writes `bytes` to `path` atomically: a temp file beside it, fsynced, renamed over it.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    // `ID.json.N.tmp`: never the temp file of a sibling, nor of another write of the same file.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", NEXT.fetch_add(1, Ordering::Relaxed)));
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(d) = path.parent().and_then(|d| File::open(d).ok()) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The default state directory: `$XDG_STATE_HOME/shoal`, else `~/.local/state/shoal`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("shoal");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/state/shoal")
}

/// Reads a batch's results journal: the records, in file order. A torn last line (a crash
/// while appending) is cut off when `repair`.
pub fn read_results(path: &Path, repair: bool) -> Result<Vec<Value>, Error> {
    let mut f = match OpenOptions::new().read(true).write(repair).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    };
    let mut out = Vec::new();
    let mut good = 0u64;
    let mut r = BufReader::new(&mut f);
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line).map_err(io(path))?;
        if n == 0 {
            break;
        }
        match serde_json::from_str::<Value>(line.trim_end()) {
            Ok(v) if line.ends_with('\n') => {
                out.push(v);
                good += n as u64;
            }
            _ => {
                // Only the last line may be torn; anything after it is not trusted either.
                tracing::warn!("{}: dropping a torn record at byte {good}", path.display());
                break;
            }
        }
    }
    drop(r);
    if repair && f.metadata().map_err(io(path))?.len() != good {
        f.set_len(good).map_err(io(path))?;
        f.sync_all().map_err(io(path))?;
    }
    Ok(out)
}

/// The lines a journal has records for, and how many of them succeeded and failed (a line
/// recorded twice counts once).
fn tally(records: &[Value]) -> (HashSet<usize>, usize, usize) {
    let mut done = HashSet::new();
    let (mut ok, mut failed) = (0, 0);
    for r in records {
        if let Some(i) = r["line"].as_u64()
            && done.insert(i as usize)
        {
            if r["ok"].as_bool() == Some(true) {
                ok += 1;
            } else {
                failed += 1;
            }
        }
    }
    (done, ok, failed)
}

impl Jobs {
    /// Opens (creating) the state directory `dir`, locks it and reads its files and batches.
    pub fn open(dir: &Path) -> Result<Jobs, Error> {
        for d in [dir.to_path_buf(), dir.join("files"), dir.join("batches")] {
            fs::create_dir_all(&d).map_err(io(&d))?;
        }
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(Error::Locked(dir.to_path_buf())),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let mut st = Store::default();
        for (sub, is_file) in [("files", true), ("batches", false)] {
            let d = dir.join(sub);
            for e in fs::read_dir(&d).map_err(io(&d))? {
                let p = e.map_err(io(&d))?.path();
                if p.extension().is_some_and(|x| x == "tmp") {
                    // A write cut short by a crash; the file it was replacing is intact.
                    let _ = fs::remove_file(&p);
                    continue;
                }
                if p.extension().is_none_or(|x| x != "json") {
                    continue;
                }
                let text = fs::read_to_string(&p).map_err(io(&p))?;
                let corrupt = |e: serde_json::Error| Error::Corrupt { path: p.clone(), msg: e.to_string() };
                if is_file {
                    let m: FileMeta = serde_json::from_str(&text).map_err(corrupt)?;
                    st.files.insert(m.id.clone(), m);
                } else {
                    let b: Batch = serde_json::from_str(&text).map_err(corrupt)?;
                    st.batches.insert(b.id.clone(), b);
                }
            }
        }
        let jobs = Jobs { dir: dir.to_path_buf(), state: Mutex::new(st), wake: Notify::new(), _lock: lock };
        let active: Vec<String> = jobs.state().batches.values().filter(|b| b.active()).map(|b| b.id.clone()).collect();
        for id in active {
            let (done, ok, failed) = tally(&read_results(&jobs.results_path(&id), true)?);
            let mut st = jobs.state();
            if let Some(b) = st.batches.get_mut(&id) {
                tracing::info!("batch {id}: resuming with {} of {} lines done", done.len(), b.total);
                b.completed = ok;
                b.failed = failed;
            }
            st.done.insert(id, done);
        }
        Ok(jobs)
    }

    fn state(&self) -> MutexGuard<'_, Store> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file_data(&self, id: &str) -> PathBuf {
        self.dir.join("files").join(format!("{id}.data"))
    }

    fn results_path(&self, id: &str) -> PathBuf {
        self.dir.join("batches").join(format!("{id}.results.jsonl"))
    }

    fn save_batch(&self, b: &Batch) -> Result<(), Error> {
        let p = self.dir.join("batches").join(format!("{}.json", b.id));
        write_atomic(&p, &serde_json::to_vec_pretty(b).unwrap_or_default())
    }

    /// Stores a file and returns its object.
    pub fn add_file(&self, filename: &str, purpose: &str, bytes: &[u8]) -> Result<FileMeta, Error> {
        let m = FileMeta { id: new_id("file-"), bytes: bytes.len() as u64, created_at: now(), filename: filename.into(), purpose: purpose.into() };
        write_atomic(&self.file_data(&m.id), bytes)?;
        let p = self.dir.join("files").join(format!("{}.json", m.id));
        write_atomic(&p, &serde_json::to_vec_pretty(&m).unwrap_or_default())?;
        self.state().files.insert(m.id.clone(), m.clone());
        Ok(m)
    }

    pub fn file(&self, id: &str) -> Option<FileMeta> {
        self.state().files.get(id).cloned()
    }

    pub fn batch(&self, id: &str) -> Option<Batch> {
        self.state().batches.get(id).cloned()
    }

    /// What `/metrics` shows of the jobs.
    pub fn counts(&self) -> JobCounts {
        let st = self.state();
        let mut c = JobCounts { lines_completed: st.lines_completed, lines_failed: st.lines_failed, ..JobCounts::default() };
        for b in st.batches.values() {
            *c.batches.entry(b.status.clone()).or_default() += 1;
        }
        c
    }

    /// Checks an input file against `endpoint`: its lines, or the validation errors.
    fn parse_input(&self, file: &FileMeta, endpoint: &str) -> Result<Vec<InputLine>, Vec<Value>> {
        let err = |line: Option<usize>, msg: String| json!({"code": "invalid_request", "message": msg, "param": null, "line": line});
        let data = fs::read(self.file_data(&file.id)).map_err(|e| vec![err(None, format!("reading the input file: {e}"))])?;
        let mut lines = Vec::new();
        let mut errors = Vec::new();
        let mut ids = HashSet::new();
        for (i, l) in data.split(|&b| b == b'\n').enumerate() {
            if l.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let n = i + 1;
            match serde_json::from_slice::<InputLine>(l) {
                Err(e) => errors.push(err(Some(n), format!("line {n} is not a request object: {e}"))),
                Ok(x) if x.method != "POST" => errors.push(err(Some(n), format!("line {n}: method must be POST, got {:?}", x.method))),
                Ok(x) if x.url != endpoint => {
                    errors.push(err(Some(n), format!("line {n}: url {:?} is not the batch's endpoint {endpoint}", x.url)))
                }
                Ok(x) if !x.body.is_object() => errors.push(err(Some(n), format!("line {n}: body must be an object"))),
                Ok(x) if !ids.insert(x.custom_id.clone()) => {
                    errors.push(err(Some(n), format!("line {n}: custom_id {:?} is used twice", x.custom_id)))
                }
                Ok(x) => lines.push(x),
            }
            if errors.len() >= 100 {
                break;
            }
        }
        if errors.is_empty() && lines.is_empty() {
            errors.push(err(None, "the input file has no requests".into()));
        }
        if lines.len() > MAX_LINES {
            errors.push(err(None, format!("the input file has {} requests; at most {MAX_LINES}", lines.len())));
        }
        if errors.is_empty() { Ok(lines) } else { Err(errors) }
    }

    /// Creates a batch on `input_file_id` (already checked to exist) and wakes the runner.
    fn create(&self, file: &FileMeta, endpoint: &str, window: &str, metadata: Option<Value>) -> Result<Batch, Error> {
        let t = now();
        let mut b = Batch {
            id: new_id("batch_"),
            endpoint: endpoint.into(),
            input_file_id: file.id.clone(),
            completion_window: window.into(),
            status: "in_progress".into(),
            created_at: t,
            in_progress_at: Some(t),
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            cancelling_at: None,
            cancelled_at: None,
            expires_at: t + 24 * 3600,
            output_file_id: None,
            error_file_id: None,
            errors: None,
            metadata,
            total: 0,
            completed: 0,
            failed: 0,
        };
        match self.parse_input(file, endpoint) {
            Ok(lines) => b.total = lines.len(),
            Err(errors) => {
                b.status = "failed".into();
                b.in_progress_at = None;
                b.failed_at = Some(t);
                b.errors = Some(json!({"object": "list", "data": errors}));
            }
        }
        self.save_batch(&b)?;
        let mut st = self.state();
        if b.active() {
            st.done.insert(b.id.clone(), HashSet::new());
        }
        st.batches.insert(b.id.clone(), b.clone());
        drop(st);
        self.wake.notify_one();
        Ok(b)
    }

    /// Asks a batch to stop: `cancelling` until its running lines end, then `cancelled`.
    fn cancel(&self, id: &str) -> Result<Option<Batch>, Error> {
        // Saved under the lock, so a concurrent `finalize` sees either state, never half.
        let mut st = self.state();
        let Some(b) = st.batches.get(id) else { return Ok(None) };
        if b.status != "in_progress" {
            return Ok(Some(b.clone()));
        }
        let mut b = b.clone();
        b.status = "cancelling".into();
        b.cancelling_at = Some(now());
        self.save_batch(&b)?;
        st.batches.insert(id.into(), b.clone());
        drop(st);
        self.wake.notify_one();
        Ok(Some(b))
    }

    /// Appends a line's record to its batch's journal (fsynced) and counts it.
    fn record(&self, batch: &str, line: usize, ok: bool, record: Value) -> Result<(), Error> {
        let p = self.results_path(batch);
        let mut text = json!({"line": line, "ok": ok, "record": record}).to_string();
        text.push('\n');
        let mut st = self.state();
        // Appended under the lock, so records never interleave.
        let mut f = OpenOptions::new().create(true).append(true).open(&p).map_err(io(&p))?;
        f.write_all(text.as_bytes()).map_err(io(&p))?;
        f.sync_data().map_err(io(&p))?;
        if st.done.get_mut(batch).is_some_and(|d| d.insert(line))
            && let Some(b) = st.batches.get_mut(batch)
        {
            if ok {
                b.completed += 1;
                st.lines_completed += 1;
            } else {
                b.failed += 1;
                st.lines_failed += 1;
            }
        }
        Ok(())
    }

    /// Ends a batch whose lines all have records (or that was cancelled): writes the output
    /// and error files from its journal and saves its final status.
    fn finalize(&self, id: &str) -> Result<(), Error> {
        let mut st = self.state();
        let Some(mut b) = st.batches.get(id).cloned() else { return Ok(()) };
        let cancelled = b.status == "cancelling";
        if !cancelled {
            // Under the lock: a cancel now finds `finalizing` and leaves it be.
            b.status = "finalizing".into();
            b.finalizing_at = Some(now());
            self.save_batch(&b)?;
            st.batches.insert(id.into(), b.clone());
        }
        drop(st);
        let mut records = read_results(&self.results_path(id), true)?;
        records.sort_by_key(|r| r["line"].as_u64().unwrap_or(u64::MAX));
        records.dedup_by_key(|r| r["line"].as_u64());
        let mut out = String::new();
        let mut errs = String::new();
        for r in &records {
            let dst = if r["ok"].as_bool() == Some(true) { &mut out } else { &mut errs };
            dst.push_str(&r["record"].to_string());
            dst.push('\n');
        }
        if !out.is_empty() {
            b.output_file_id = Some(self.add_file(&format!("{id}_output.jsonl"), "batch_output", out.as_bytes())?.id);
        }
        if !errs.is_empty() {
            b.error_file_id = Some(self.add_file(&format!("{id}_error.jsonl"), "batch_output", errs.as_bytes())?.id);
        }
        let t = now();
        if cancelled {
            b.status = "cancelled".into();
            b.cancelled_at = Some(t);
        } else {
            b.status = "completed".into();
            b.completed_at = Some(t);
        }
        self.save_batch(&b)?;
        let mut st = self.state();
        st.done.remove(id);
        st.batches.insert(id.into(), b);
        Ok(())
    }

    /// Ends a running batch as `failed` with `why`.
    fn fail(&self, id: &str, why: &str) -> Result<(), Error> {
        let mut st = self.state();
        let Some(mut b) = st.batches.get(id).cloned() else { return Ok(()) };
        tracing::error!("batch {id}: {why}");
        b.status = "failed".into();
        b.failed_at = Some(now());
        b.errors = Some(json!({"object": "list", "data": [{"code": "batch_failed", "message": why, "param": null, "line": null}]}));
        self.save_batch(&b)?;
        st.done.remove(id);
        st.batches.insert(id.into(), b);
        Ok(())
    }

    /// The oldest batch the runner has work on.
    fn next_active(&self) -> Option<Batch> {
        let st = self.state();
        st.batches.values().filter(|b| b.active()).min_by_key(|b| (b.created_at, b.id.clone())).cloned()
    }

    fn is_cancelling(&self, id: &str) -> bool {
        self.state().batches.get(id).is_none_or(|b| b.status == "cancelling")
    }
}

/// Runs batches for as long as the server runs: `parallel` lines at once at most.
pub async fn runner(st: Arc<ApiState>, parallel: usize) {
    let Some(jobs) = st.jobs.clone() else { return };
    let permits = Arc::new(Semaphore::new(parallel.max(1)));
    loop {
        let woken = jobs.wake.notified();
        let Some(b) = jobs.next_active() else {
            woken.await;
            continue;
        };
        if let Err(e) = run_batch(&st, &jobs, &b, &permits).await {
            // The state directory failed (disk full, removed): say so and retry later rather
            // than lose the batch.
            tracing::error!("batch {}: {e}", b.id);
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    }
}

async fn run_batch(st: &Arc<ApiState>, jobs: &Arc<Jobs>, b: &Batch, permits: &Arc<Semaphore>) -> Result<(), Error> {
    if b.status == "in_progress" {
        let file = jobs.file(&b.input_file_id);
        let lines = match file.map(|f| jobs.parse_input(&f, &b.endpoint)) {
            Some(Ok(lines)) => lines,
            // The input vanished or changed under a running batch: it cannot go on.
            _ => return jobs.fail(&b.id, "the input file of the running batch is gone or no longer valid"),
        };
        let done = jobs.state().done.get(&b.id).cloned().unwrap_or_default();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, line) in lines.into_iter().enumerate() {
            if done.contains(&i) {
                continue;
            }
            let permit = tokio::select! {
                p = Arc::clone(permits).acquire_owned() => p.expect("the semaphore is never closed"),
                _ = wait_cancel(jobs, &b.id) => break,
            };
            if jobs.is_cancelling(&b.id) {
                break;
            }
            let (st, jobs2, id) = (Arc::clone(st), Arc::clone(jobs), b.id.clone());
            tasks.spawn(async move {
                let (ok, record) = run_line(&st, &jobs2, &id, &line).await;
                drop(permit);
                // The fsync stays off the async threads.
                tokio::task::spawn_blocking(move || jobs2.record(&id, i, ok, record))
                    .await
                    .unwrap_or_else(|e| Err(Error::Corrupt { path: PathBuf::new(), msg: format!("recording a line: {e}") }))
            });
            // Reap finished lines as we go, so a journal error surfaces early.
            while let Some(r) = tasks.try_join_next() {
                r.unwrap_or(Ok(()))?;
            }
        }
        loop {
            tokio::select! {
                r = tasks.join_next() => match r {
                    None => break,
                    Some(r) => r.unwrap_or(Ok(()))?,
                },
                _ = wait_cancel(jobs, &b.id) => {
                    // Dropping a running line's receiver ends its sequence at the next step.
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
    }
    jobs.finalize(&b.id)
}

/// Resolves once batch `id` is being cancelled.
async fn wait_cancel(jobs: &Jobs, id: &str) {
    loop {
        if jobs.is_cancelling(id) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs one input line; returns whether it succeeded and its output record.
async fn run_line(st: &ApiState, jobs: &Jobs, batch: &str, line: &InputLine) -> (bool, Value) {
    let request_id = new_id("req_");
    let mut attempt = 0;
    let answer = loop {
        attempt += 1;
        let t0 = Instant::now();
        let r = async {
            let p = if line.url == "/v1/completions" {
                api::prepare_completion(&st.request_context(), api::parse_body(line.body.clone())?)?
            } else {
                api::prepare_chat(&st.request_context(), api::parse_body(line.body.clone())?)?
            };
            if p.streams() {
                return Err(ApiError::bad("stream", "a batch request cannot stream"));
            }
            api::answer_whole(st, &p, Priority::Background, t0).await
        }
        .await;
        match r {
            Err(e) if e.is_retryable() && attempt < MAX_ATTEMPTS && !jobs.is_cancelling(batch) => {
                let wait = Duration::from_secs(1 << attempt.min(5));
                tracing::warn!("batch {batch} line {:?}: {} (attempt {attempt}; again in {wait:?})", line.custom_id, e.message());
                tokio::time::sleep(wait).await;
            }
            r => break r,
        }
    };
    let id = new_id("batch_req_");
    match answer {
        Ok(body) => (
            true,
            json!({"id": id, "custom_id": line.custom_id, "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": null}),
        ),
        Err(e) => (
            false,
            json!({"id": id, "custom_id": line.custom_id,
                   "response": {"status_code": e.status().as_u16(), "request_id": request_id, "body": e.body()},
                   "error": null}),
        ),
    }
}

// ---- HTTP handlers ----

fn jobs_of(st: &ApiState) -> Result<&Arc<Jobs>, ApiError> {
    st.jobs.as_ref().ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "batch jobs are off on this server".into()))
}

fn disk(e: Error) -> ApiError {
    tracing::error!("state directory: {e}");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", format!("the server could not store the job: {e}"))
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("no {what} with id {id:?}"))
}

/// `POST /v1/files` (multipart: `file`, `purpose`).
pub async fn upload(State(st): State<Arc<ApiState>>, mp: Result<Multipart, axum::extract::multipart::MultipartRejection>) -> Response {
    let r = async {
        let jobs = jobs_of(&st)?;
        let mut mp = mp.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", e.body_text()))?;
        let mut purpose = None;
        let mut file = None;
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(ApiError::new(e.status(), "invalid_request_error", format!("reading the upload: {e}"))),
            };
            let name = field.name().unwrap_or_default().to_string();
            let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
            let bytes = field
                .bytes()
                .await
                .map_err(|e| ApiError::new(e.status(), "invalid_request_error", format!("reading the upload: {e}")))?;
            match name.as_str() {
                "purpose" => purpose = Some(String::from_utf8_lossy(&bytes).trim().to_string()),
                "file" => file = Some((filename, bytes)),
                _ => {}
            }
        }
        let purpose = purpose.ok_or_else(|| ApiError::bad("purpose", "the form has no `purpose` field"))?;
        if purpose != "batch" {
            return Err(ApiError::bad("purpose", format!("purpose must be \"batch\" (the only use of files here), got {purpose:?}")));
        }
        let (filename, bytes) = file.ok_or_else(|| ApiError::bad("file", "the form has no `file` field"))?;
        if std::str::from_utf8(&bytes).is_err() {
            return Err(ApiError::bad("file", "the file is not UTF-8 JSONL"));
        }
        let m = jobs.add_file(&filename, &purpose, &bytes).map_err(disk)?;
        Ok(Json(m.json()).into_response())
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

pub async fn list_files(State(st): State<Arc<ApiState>>) -> Response {
    match jobs_of(&st) {
        Ok(j) => {
            let data: Vec<Value> = j.state().files.values().map(FileMeta::json).collect();
            Json(json!({"object": "list", "data": data, "has_more": false})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

pub async fn get_file(State(st): State<Arc<ApiState>>, UrlPath(id): UrlPath<String>) -> Response {
    let r = jobs_of(&st).and_then(|j| j.file(&id).ok_or_else(|| not_found("file", &id)));
    r.map(|m| Json(m.json()).into_response()).unwrap_or_else(IntoResponse::into_response)
}

pub async fn file_content(State(st): State<Arc<ApiState>>, UrlPath(id): UrlPath<String>) -> Response {
    let r = async {
        let jobs = jobs_of(&st)?;
        if !safe_id(&id) || jobs.file(&id).is_none() {
            return Err(not_found("file", &id));
        }
        let path = jobs.file_data(&id);
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || fs::read(path)).await
        };
        let bytes = read
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()))?
            .map_err(|e| disk(io(&path)(e)))?;
        Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

pub async fn delete_file(State(st): State<Arc<ApiState>>, UrlPath(id): UrlPath<String>) -> Response {
    let r = (|| {
        let jobs = jobs_of(&st)?;
        let mut s = jobs.state();
        if !s.files.contains_key(&id) {
            return Err(not_found("file", &id));
        }
        if s.batches.values().any(|b| b.active() && b.input_file_id == id) {
            return Err(ApiError::bad("file_id", format!("file {id} is the input of a running batch")));
        }
        s.files.remove(&id);
        drop(s);
        let _ = fs::remove_file(jobs.dir.join("files").join(format!("{id}.json")));
        let _ = fs::remove_file(jobs.file_data(&id));
        Ok(Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Deserialize, Debug)]
pub struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<Value>,
}

/// `POST /v1/batches`.
pub async fn create_batch(State(st): State<Arc<ApiState>>, req: Result<Json<CreateBatch>, axum::extract::rejection::JsonRejection>) -> Response {
    let r = async {
        let jobs = jobs_of(&st)?;
        let req = api::body(req)?;
        if !ENDPOINTS.contains(&req.endpoint.as_str()) {
            return Err(ApiError::bad("endpoint", format!("endpoint must be one of {ENDPOINTS:?}, got {:?}", req.endpoint)));
        }
        if req.completion_window != "24h" {
            return Err(ApiError::bad("completion_window", format!("completion_window must be \"24h\", got {:?}", req.completion_window)));
        }
        if req.metadata.as_ref().is_some_and(|m| !m.is_object() && !m.is_null()) {
            return Err(ApiError::bad("metadata", "metadata must be an object"));
        }
        let file = jobs.file(&req.input_file_id).ok_or_else(|| not_found("file", &req.input_file_id))?;
        if file.purpose != "batch" {
            return Err(ApiError::bad("input_file_id", format!("file {} has purpose {:?}, not \"batch\"", file.id, file.purpose)));
        }
        let jobs = Arc::clone(jobs);
        let b = tokio::task::spawn_blocking(move || jobs.create(&file, &req.endpoint, &req.completion_window, req.metadata))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()))?
            .map_err(disk)?;
        Ok(Json(b.json()).into_response())
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

pub async fn get_batch(State(st): State<Arc<ApiState>>, UrlPath(id): UrlPath<String>) -> Response {
    let r = jobs_of(&st).and_then(|j| j.batch(&id).ok_or_else(|| not_found("batch", &id)));
    r.map(|b| Json(b.json()).into_response()).unwrap_or_else(IntoResponse::into_response)
}

pub async fn cancel_batch(State(st): State<Arc<ApiState>>, UrlPath(id): UrlPath<String>) -> Response {
    let r = jobs_of(&st).and_then(|j| j.cancel(&id).map_err(disk)?.ok_or_else(|| not_found("batch", &id)));
    r.map(|b| Json(b.json()).into_response()).unwrap_or_else(IntoResponse::into_response)
}

#[derive(Deserialize, Debug)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/batches`: newest first, `limit` (default 20, at most 100) after `after`.
pub async fn list_batches(State(st): State<Arc<ApiState>>, q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>) -> Response {
    let r = (|| {
        let jobs = jobs_of(&st)?;
        let Query(q) = q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", e.body_text()))?;
        let limit = q.limit.unwrap_or(20);
        if !(1..=100).contains(&limit) {
            return Err(ApiError::bad("limit", format!("limit must be in 1..=100, got {limit}")));
        }
        let mut all: Vec<Batch> = jobs.state().batches.values().cloned().collect();
        all.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        let start = match &q.after {
            Some(a) => all.iter().position(|b| &b.id == a).map(|i| i + 1).ok_or_else(|| not_found("batch", a))?,
            None => 0,
        };
        let page: Vec<Value> = all.iter().skip(start).take(limit).map(Batch::json).collect();
        let has_more = all.len() > start + page.len();
        let first = page.first().map(|b| b["id"].clone());
        let last = page.last().map(|b| b["id"].clone());
        Ok(Json(json!({"object": "list", "data": page, "first_id": first, "last_id": last, "has_more": has_more})).into_response())
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

/// The batches of a state directory read from disk, newest first, with the progress of the
/// running ones counted from their journals (for `shoal jobs`, with or without a server).
pub fn read_dir_batches(dir: &Path) -> Result<Vec<Batch>, Error> {
    let d = dir.join("batches");
    let mut out = Vec::new();
    let entries = match fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(&d)(e)),
    };
    for e in entries {
        let p = e.map_err(io(&d))?.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let text = fs::read_to_string(&p).map_err(io(&p))?;
        let mut b: Batch = serde_json::from_str(&text).map_err(|e| Error::Corrupt { path: p.clone(), msg: e.to_string() })?;
        if b.active() {
            let (_, ok, failed) = tally(&read_results(&d.join(format!("{}.results.jsonl", b.id)), false)?);
            b.completed = ok;
            b.failed = failed;
        }
        out.push(b);
    }
    out.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shoal-jobs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn line(id: &str, url: &str) -> String {
        json!({"custom_id": id, "method": "POST", "url": url, "body": {"prompt": "x"}}).to_string()
    }

    #[test]
    fn a_restart_resumes_from_the_journal_and_cuts_a_torn_record() {
        let dir = temp("resume");
        let input = [line("a", "/v1/completions"), line("b", "/v1/completions"), line("c", "/v1/completions")].join("\n");
        let id = {
            let jobs = Jobs::open(&dir).unwrap();
            assert!(matches!(Jobs::open(&dir), Err(Error::Locked(_))), "a second server must not share the directory");
            let f = jobs.add_file("in.jsonl", "batch", input.as_bytes()).unwrap();
            let b = jobs.create(&f, "/v1/completions", "24h", None).unwrap();
            assert_eq!((b.status.as_str(), b.total), ("in_progress", 3));
            jobs.record(&b.id, 2, true, json!({"custom_id": "c"})).unwrap();
            jobs.record(&b.id, 0, false, json!({"custom_id": "a"})).unwrap();
            b.id
        };
        // A crash while appending the third record.
        let journal = dir.join("batches").join(format!("{id}.results.jsonl"));
        let whole = fs::read(&journal).unwrap();
        let mut f = OpenOptions::new().append(true).open(&journal).unwrap();
        f.write_all(br#"{"line":1,"ok":tr"#).unwrap();
        drop(f);
        let jobs = Jobs::open(&dir).unwrap();
        assert_eq!(fs::read(&journal).unwrap(), whole, "the torn record is cut off");
        let b = jobs.batch(&id).unwrap();
        assert_eq!((b.completed, b.failed, b.total), (1, 1, 3));
        assert_eq!(jobs.state().done[&id], HashSet::from([0, 2]));
        // Line 1 runs after the restart; then the files hold each line once, in input order.
        jobs.record(&id, 1, true, json!({"custom_id": "b"})).unwrap();
        jobs.finalize(&id).unwrap();
        let b = jobs.batch(&id).unwrap();
        assert_eq!((b.status.as_str(), b.completed, b.failed), ("completed", 2, 1));
        let out = fs::read_to_string(jobs.file_data(b.output_file_id.as_deref().unwrap())).unwrap();
        assert_eq!(out, "{\"custom_id\":\"b\"}\n{\"custom_id\":\"c\"}\n");
        let err = fs::read_to_string(jobs.file_data(b.error_file_id.as_deref().unwrap())).unwrap();
        assert_eq!(err, "{\"custom_id\":\"a\"}\n");
        let listed = read_dir_batches(&dir).unwrap();
        assert_eq!((listed.len(), listed[0].status.as_str()), (1, "completed"));
        drop(jobs);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn invalid_inputs_fail_the_batch_with_the_lines_named() {
        let dir = temp("invalid");
        let jobs = Jobs::open(&dir).unwrap();
        let input = [
            line("a", "/v1/completions"),
            "not json".to_string(),
            line("a", "/v1/completions"),
            line("b", "/v1/chat/completions"),
            String::new(),
        ]
        .join("\n");
        let f = jobs.add_file("in.jsonl", "batch", input.as_bytes()).unwrap();
        let b = jobs.create(&f, "/v1/completions", "24h", None).unwrap();
        assert_eq!(b.status, "failed");
        let lines: Vec<u64> = b.errors.unwrap()["data"].as_array().unwrap().iter().map(|e| e["line"].as_u64().unwrap()).collect();
        assert_eq!(lines, [2, 3, 4]);
        let empty = jobs.add_file("empty.jsonl", "batch", b"\n\n").unwrap();
        assert_eq!(jobs.create(&empty, "/v1/completions", "24h", None).unwrap().status, "failed");
        assert!(!safe_id("../x") && !safe_id("") && safe_id("file-00ab"));
        drop(jobs);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cancel_racing_the_last_record_ends_the_batch_once_on_disk_and_in_memory() {
        let dir = temp("race");
        let jobs = Arc::new(Jobs::open(&dir).unwrap());
        let f = jobs.add_file("in.jsonl", "batch", line("a", "/v1/completions").as_bytes()).unwrap();
        for _ in 0..40 {
            let b = jobs.create(&f, "/v1/completions", "24h", None).unwrap();
            jobs.record(&b.id, 0, true, json!({"custom_id": "a"})).unwrap();
            let (j, id) = (jobs.clone(), b.id.clone());
            let canceller = std::thread::spawn(move || j.cancel(&id).map(|b| b.map(|b| b.status)));
            jobs.finalize(&b.id).unwrap();
            let seen = canceller.join().unwrap().expect("a cancel racing finalize is not a server error");
            let seen = seen.unwrap();
            assert!(["cancelling", "finalizing", "completed"].contains(&seen.as_str()), "{seen}");
            let mem = jobs.batch(&b.id).unwrap();
            // A cancel that landed first leaves the batch cancelled; otherwise it completes.
            let want = if seen == "cancelling" { "cancelled" } else { "completed" };
            assert_eq!(mem.status, want);
            let disk = read_dir_batches(&dir).unwrap().into_iter().find(|d| d.id == b.id).unwrap();
            assert_eq!(disk.status, mem.status, "disk and memory agree");
        }
        let stray: Vec<_> = fs::read_dir(dir.join("batches")).unwrap().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "tmp")).collect();
        assert!(stray.is_empty(), "no temp file is left behind");
        drop(jobs);
        let _ = fs::remove_dir_all(&dir);
    }
}
