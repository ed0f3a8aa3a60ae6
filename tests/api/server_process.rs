//! `billing-mode serve` as a child process: the real binary, on a free port,
//! its address read from its ready line, for the tests that need the process
//! itself (its exit, its environment, its exporter).

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// A running `billing-mode serve`; killed on drop.
pub(crate) struct ServerProcess {
    child: Child,
    /// The bound gRPC address, `127.0.0.1:PORT`.
    pub addr: String,
    /// The admin listener's bound address, unless it is off.
    pub admin_addr: Option<std::net::SocketAddr>,
    /// Everything it logged so far (stderr).
    pub log: Arc<Mutex<String>>,
    /// The thread reading stderr into `log`; it ends when the pipe closes.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ServerProcess {
    /// Starts `billing-mode serve --listen 127.0.0.1:0 --database-url URL
    /// ARGS...` with `envs` added to the environment (and no `OTEL_*`
    /// variable but those), and waits for its
    /// ready line. The admin listener, when the binary has one, also takes
    /// a free port, so that servers started side by side never collide.
    pub(crate) fn start(database_url: &str, args: &[&str], envs: &[(&str, &str)]) -> ServerProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_billing-mode"));
        // Only what the test gives: no exporter or sampler settings from
        // the environment the tests run in.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("OTEL_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                database_url,
            ])
            .args(args)
            .env_remove("RUST_LOG")
            .env("BILLING_MODE_LOG_FORMAT", "text")
            .env("BILLING_MODE_ADMIN_LISTEN", "127.0.0.1:0")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start billing-mode serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        // Keep draining stderr for the server's whole life, so it never
        // blocks on a full pipe; the ready line carries the bound address.
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ready:") {
                    let field = |name: &str| {
                        line.split_whitespace()
                            .find_map(|w| w.strip_prefix(name))
                            .map(str::to_owned)
                    };
                    if let Some(addr) = field("addr=") {
                        let _ = tx.send((addr, field("admin=")));
                    }
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let (addr, admin) = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(ready) => ready,
            Err(_) => {
                let _ = child.kill();
                panic!("the server did not start:\n{}", log.lock().unwrap())
            }
        };
        // `admin=off` when the listener is off.
        let admin_addr = admin.and_then(|a| a.parse().ok());
        ServerProcess {
            child,
            addr,
            admin_addr,
            log,
            reader: Some(reader),
        }
    }

    /// Stops it as an orchestrator would (SIGTERM) and waits for it to exit
    /// and for its log to be read to the end: [`ServerProcess::log`] then
    /// holds every line it wrote.
    pub(crate) fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(reader) = self.reader.take() {
                    reader.join().expect("the log reader");
                }
                return status;
            }
            if started.elapsed() > Duration::from_secs(120) {
                let _ = self.child.kill();
                panic!(
                    "the server did not stop after SIGTERM:\n{}",
                    self.log.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`ServerProcess::terminate`] from a test's async body: waited for
    /// off the runtime, which meanwhile serves what the test still runs on
    /// it (a client's connection closing, which the server waits for
    /// before it exits; a receiver of what it sends on the way out).
    pub(crate) async fn stop(self) -> (ExitStatus, ServerProcess) {
        tokio::task::spawn_blocking(move || {
            let mut server = self;
            (server.terminate(), server)
        })
        .await
        .expect("wait for the server to stop")
    }

    /// Sends it `signal` (`TERM`, `INT`, `HUP`) and returns at once.
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Its exit status, if it has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// The log so far.
    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
