//! Standard error for the log lines, written many lines at a time.
//!
//! Every request the service answers writes its decision line, and an
//! unbuffered standard error makes each line a `write` of its own: a system
//! call on the request's path, a lock that the runtime's worker threads
//! contend for, and (where standard error is a pipe, as in a container) a
//! wake-up of the process reading it, per request. Here a runtime worker
//! thread appends its lines to a buffer of its own and writes the buffer
//! out in one `write` when it has nothing left to run (the runtime's
//! `on_thread_park` calls [`worker_parks`]), when the buffer holds
//! [`WRITE_AT`] bytes, and at the latest every [`FLUSH_EVERY`] (a ticker
//! thread, for a worker kept busy by requests that log nothing). So a line
//! is out as soon as the worker is idle, and within [`FLUSH_EVERY`] under
//! any load. [`flush_all`] writes everything out (the telemetry guard calls
//! it when it is dropped), and a thread's buffer is written out when the
//! thread stops (its thread-local is dropped).
//!
//! Lines are written whole and each buffer keeps its lines' order; lines of
//! two threads can reach the output up to [`FLUSH_EVERY`] apart from the
//! order of their timestamps. What is lost if the process is killed
//! (`SIGKILL`, an abort) is what the buffers held: at most [`FLUSH_EVERY`]
//! of lines.
//!
//! Threads that are not runtime workers (the main thread, the blocking
//! pool, a test's) write straight through, as before: a thread buffers only
//! once it has parked as a worker, so a line never waits on a thread that
//! will not park.
//!
//! Why not `tracing-appender`'s non-blocking writer: it hands each line to a
//! writer thread over a channel, which on a small machine is a wake-up of
//! another thread per line instead of a system call, and it still writes
//! each line with its own `write`.

use std::{
    cell::RefCell,
    io::Write,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock, PoisonError,
    },
    time::Duration,
};

use tracing_subscriber::fmt::MakeWriter;

/// A buffer this full is written out at once.
pub const WRITE_AT: usize = 16 * 1024;
/// The ticker writes out every buffer this often.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

type Buffer = Arc<Mutex<Vec<u8>>>;

/// The buffers of the threads that buffer; `on` is false once
/// [`flush_all`] has run for shutdown, after which every line goes
/// straight through.
struct Buffers {
    all: Mutex<Vec<Buffer>>,
    on: AtomicBool,
}

static BUFFERS: OnceLock<Buffers> = OnceLock::new();

/// The buffers, and the ticker started with them (the first time a worker
/// parks).
fn buffers() -> &'static Buffers {
    BUFFERS.get_or_init(|| {
        // The ticker writes out the lines a busy worker holds. It holds no
        // buffer's lock while it sleeps.
        let ticker = std::thread::Builder::new()
            .name("log-lines".into())
            .spawn(|| loop {
                std::thread::sleep(FLUSH_EVERY);
                #[cfg(test)]
                if !tests::TICKING.load(Ordering::Acquire) {
                    continue;
                }
                write_out_all();
            });
        Buffers {
            all: Mutex::new(Vec::new()),
            // Without a ticker, no line is held.
            on: AtomicBool::new(ticker.is_ok()),
        }
    })
}

/// This thread's buffer, once it has parked as a runtime worker; written
/// out when the thread stops.
struct Mine(Option<Buffer>);

impl Drop for Mine {
    fn drop(&mut self) {
        if let Some(b) = &self.0 {
            write_out(b);
        }
    }
}

thread_local! {
    static MINE: RefCell<Mine> = const { RefCell::new(Mine(None)) };
}

/// For the runtime's `on_thread_park`: this thread buffers its lines from
/// now on, and writes out what it holds.
pub fn worker_parks() {
    let _ = MINE.try_with(|m| {
        let mut m = m.borrow_mut();
        match &m.0 {
            Some(b) => write_out(b),
            None => {
                let all = buffers();
                if all.on.load(Ordering::Acquire) {
                    let b = Buffer::default();
                    lock(&all.all).push(b.clone());
                    m.0 = Some(b);
                }
            }
        }
    });
}

/// Writes out every buffer, and from now on every line goes straight
/// through (for shutdown: nothing logged after it waits).
pub fn flush_all() {
    // No buffers yet: nothing held, and no ticker to start.
    if let Some(all) = BUFFERS.get() {
        all.on.store(false, Ordering::Release);
        write_out_all();
    }
}

fn write_out_all() {
    let all = lock(&buffers().all).clone();
    for b in &all {
        write_out(b);
    }
}

fn write_out(b: &Buffer) {
    drain(&mut lock(b));
}

/// Writes out what `held` holds, in one piece, and empties it.
fn drain(held: &mut Vec<u8>) {
    if !held.is_empty() {
        out(held);
        held.clear();
    }
}

/// Writes to standard error (in the unit tests, to [`tests::OUT`]). As the
/// unbuffered writer did, a line that cannot be written is dropped, never
/// an error on the request that logged it.
fn out(bytes: &[u8]) {
    #[cfg(not(test))]
    let _ = std::io::stderr().lock().write_all(bytes);
    #[cfg(test)]
    lock(&tests::OUT).extend_from_slice(bytes);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Standard error as a [`MakeWriter`]: buffered on a thread that buffers
/// (module docs), straight through elsewhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line
    }
}

/// One log line's writer.
#[derive(Debug)]
pub struct Line;

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.write_all(bytes)?;
        Ok(bytes.len())
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let held = MINE
            .try_with(|m| {
                let m = m.borrow();
                let b = m.0.as_ref()?;
                if !buffers().on.load(Ordering::Acquire) {
                    return None;
                }
                let mut held = lock(b);
                held.extend_from_slice(bytes);
                if held.len() >= WRITE_AT {
                    drain(&mut held);
                }
                Some(())
            })
            .ok()
            .flatten();
        if held.is_none() {
            out(bytes);
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What the module wrote out, in the unit tests (nothing else in the
    /// library's tests logs through [`Stderr`]).
    pub(crate) static OUT: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    /// Whether the ticker writes out (only in the step that tests it, so
    /// that it cannot write a line out while another step checks that the
    /// line is held).
    pub(crate) static TICKING: AtomicBool = AtomicBool::new(false);

    fn written() -> String {
        String::from_utf8(lock(&OUT).clone()).unwrap()
    }

    fn log(line: &str) {
        Stderr.make_writer().write_all(line.as_bytes()).unwrap();
    }

    /// One test, in steps, because [`flush_all`] (the last step) turns
    /// buffering off for the process. Each step's lines are its own.
    #[test]
    fn lines_are_held_until_the_worker_parks_fills_its_buffer_ticks_or_stops() {
        // A thread that has not parked as a worker writes straight through.
        std::thread::spawn(|| log("straight 1\n")).join().unwrap();
        assert!(written().contains("straight 1\n"));

        // A worker holds its lines until it parks, then writes them out in
        // order, in one piece.
        std::thread::spawn(|| {
            worker_parks();
            log("held 1\n");
            log("held 2\n");
            assert!(!written().contains("held 1"), "written before the park");
            worker_parks();
            assert!(written().contains("held 1\nheld 2\n"), "{}", written());
        })
        .join()
        .unwrap();

        // A full buffer is written out at once.
        std::thread::spawn(|| {
            worker_parks();
            let line = format!("{}\n", "f".repeat(1023));
            for _ in 0..WRITE_AT / line.len() - 1 {
                log(&line);
            }
            log("full last\n");
            assert!(!written().contains("full last"), "written before full");
            log(&line);
            assert!(written().contains("full last\n"), "not written when full");
        })
        .join()
        .unwrap();

        // A worker that keeps running (never parks again) has its lines
        // written by the ticker.
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let busy = std::thread::spawn(move || {
            worker_parks();
            log("busy 1\n");
            let _ = wait.recv();
        });
        TICKING.store(true, Ordering::Release);
        let start = std::time::Instant::now();
        while !written().contains("busy 1\n") {
            assert!(
                start.elapsed() < FLUSH_EVERY * 100,
                "the ticker did not write the line out"
            );
            std::thread::sleep(FLUSH_EVERY / 5);
        }
        TICKING.store(false, Ordering::Release);
        done.send(()).unwrap();
        busy.join().unwrap();

        // A worker's lines are written when it stops.
        std::thread::spawn(|| {
            worker_parks();
            log("stopping 1\n");
        })
        .join()
        .unwrap();
        assert!(written().contains("stopping 1\n"));

        // Shutdown: what is held is written, and from then on every line
        // goes straight through, on any thread.
        let (held, release) = std::sync::mpsc::channel::<()>();
        let (logged, check) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            worker_parks();
            log("at shutdown 1\n");
            logged.send(()).unwrap();
            let _ = release.recv();
            log("after shutdown 1\n");
            assert!(written().contains("after shutdown 1\n"));
        });
        check.recv().unwrap();
        flush_all();
        assert!(written().contains("at shutdown 1\n"));
        held.send(()).unwrap();
        worker.join().unwrap();
    }
}
