//! Running a benchmark: `threads` OS threads, each a single-threaded tokio runtime driving its
//! share of the connections (like wrk's and h2load's threads: no work stealing, no cross-thread
//! wake-ups on the request path).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;

use crate::config::BenchConfig;
use crate::error::BenchError;
use crate::recorder::Recorder;
use crate::request::Template;
use crate::result::RunResult;
use crate::schedule::Schedule;
use crate::target::Target;
use crate::worker::{self, Ctx};

/// Live counters for a progress display (relaxed atomics, updated per request).
#[derive(Debug, Default)]
pub struct Progress {
    /// Measured requests with a whole response.
    pub completed: AtomicU64,
    /// Measured requests that failed (any kind).
    pub errors: AtomicU64,
    /// Requests finished during the warm-up.
    pub warmup: AtomicU64,
}

/// Time between starting the threads and the first intended send, so connections are opened
/// before measuring and thread start-up does not count as lateness.
const LEAD: Duration = Duration::from_millis(50);

/// Runs `config` to completion: warm-up, measured window, then in-flight requests finish (or
/// time out). Fails only when the run cannot start (bad config or URL, nothing listening).
pub async fn run(config: &BenchConfig, progress: Arc<Progress>) -> Result<RunResult, BenchError> {
    config.validate()?;
    let target = Target::resolve(&config.url).await?;
    let template = Template::new(config, &target)?;
    // Fail fast on a wrong address instead of a whole run of connect errors.
    let probe = tokio::time::timeout(config.timeout, tokio::net::TcpStream::connect(target.addr)).await;
    match probe {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(BenchError::Unreachable { addr: target.addr.to_string(), why: e.to_string() }),
        Err(_) => return Err(BenchError::Unreachable { addr: target.addr.to_string(), why: "timed out".into() }),
    }

    let cpu_before = cpu_time();
    let now = Instant::now();
    let wall_now = SystemTime::now();
    let start = now + LEAD;
    let schedule = Schedule::new(start, config.warmup, config.duration, config.load.rate());
    let measure_from = schedule.measure_from();
    let end = schedule.end();
    let ctx = Arc::new(Ctx {
        schedule,
        template,
        addr: target.addr,
        timeout: config.timeout,
        protocol: config.protocol,
        keepalive: config.keepalive,
        streams: config.per_connection(),
    });

    let threads = config.effective_threads();
    let mut receivers = Vec::with_capacity(threads);
    for t in 0..threads {
        let connections = (t..config.connections).step_by(threads).count();
        let (tx, rx) = oneshot::channel();
        let ctx = ctx.clone();
        let progress = progress.clone();
        std::thread::Builder::new()
            .name(format!("plexus-bench-{t}"))
            .spawn(move || {
                let _ = tx.send(thread_main(ctx, progress, connections));
            })
            .map_err(|e| BenchError::Runtime(format!("cannot start a generator thread: {e}")))?;
        receivers.push(rx);
    }
    let mut total = Recorder::new(progress);
    for rx in receivers {
        let rec = rx.await.map_err(|_| BenchError::Runtime("a generator thread ended abnormally".into()))??;
        total.merge(rec);
    }
    let finished = Instant::now();
    let cpu = cpu_time().zip(cpu_before).map(|(after, before)| after.saturating_sub(before));

    let planned = ctx.schedule.planned_in_window();
    Ok(RunResult {
        url: target.url,
        protocol: config.protocol,
        load: config.load,
        keepalive: config.keepalive,
        connections: config.connections,
        streams: config.per_connection(),
        threads,
        duration: config.duration,
        warmup: config.warmup,
        start_time: wall_now + (measure_from - now),
        end_time: wall_now + (end - now),
        drained_after: finished.saturating_duration_since(end),
        planned,
        unsent: planned.map(|p| p.saturating_sub(total.sent)).unwrap_or(0),
        sent: total.sent,
        completed: total.completed,
        errors: total.errors,
        latency: total.latency,
        service: total.service,
        lag: total.lag,
        generator_cpu: cpu,
    })
}

/// One generator thread: a current-thread runtime running `connections` connection tasks,
/// which record into one recorder per thread (no locks, histograms allocated once).
fn thread_main(ctx: Arc<Ctx>, progress: Arc<Progress>, connections: usize) -> Result<Recorder, BenchError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Runtime(format!("cannot start a runtime: {e}")))?;
    let recorder = Rc::new(RefCell::new(Recorder::new(progress)));
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..connections {
            set.spawn_local(worker::connection(ctx.clone(), recorder.clone()));
        }
        while let Some(done) = set.join_next().await {
            done.map_err(|e| BenchError::Runtime(format!("connection task failed: {e}")))?;
        }
        Ok::<(), BenchError>(())
    })?;
    // Every task has ended, so this is the last reference.
    Rc::try_unwrap(recorder)
        .map(RefCell::into_inner)
        .map_err(|_| BenchError::Runtime("connection tasks outlived their thread".into()))
}

/// CPU time (user + system) used by this process so far.
fn cpu_time() -> Option<Duration> {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    Some(tv(usage.ru_utime) + tv(usage.ru_stime))
}
