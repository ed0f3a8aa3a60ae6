//! A private Postgres server for the tests that stop and start the store
//! under a running server (the shared test cluster is never touched): a
//! fresh cluster from the installed server binaries, on a free port, in a
//! temporary directory; stopped and removed when dropped.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

pub(crate) struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    /// Run as root: the Postgres tools run as the `postgres` user.
    as_postgres: bool,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    /// Starts one for the test `purpose`. `None` (after saying so loudly)
    /// when no Postgres server binaries are installed outside CI; under CI
    /// that is a failure.
    pub(crate) fn start(purpose: &str) -> Option<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
            .max();
        let Some(bin) = bin else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run {purpose}: Postgres server binaries are missing"
            );
            crate::helpers::loud(&format!(
                "SKIPPED: {purpose}: no /usr/lib/postgresql/*/bin/initdb"
            ));
            return None;
        };
        let as_postgres = succeeded("id", Command::new("id").arg("-u").output()).trim() == "0";
        let dir = tempfile::tempdir().expect("temp dir");
        if as_postgres {
            succeeded(
                "chown",
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(dir.path())
                    .output(),
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let pg = PrivatePostgres {
            data: dir.path().join("data"),
            bin,
            port,
            as_postgres,
            _dir: dir,
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &["-D", &data, "-U", "postgres", "--auth=trust", "--no-sync"],
        );
        pg.up();
        Some(pg)
    }

    fn data(&self) -> String {
        self.data.display().to_string()
    }

    fn command(&self, tool: &str, args: &[&str]) -> Command {
        let path = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.args(args);
        cmd
    }

    fn run(&self, tool: &str, args: &[&str]) {
        succeeded(tool, self.command(tool, args).output());
    }

    /// Starts the server (again), waiting until it accepts connections.
    pub(crate) fn up(&self) {
        let parent = self.data.parent().expect("the temporary directory");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            parent.display()
        );
        let log = parent.join("postgres.log").display().to_string();
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", &data, "-o", &opts, "-l", &log, "-w", "start"],
        );
    }

    /// Stops the server at once (`-m immediate`), as a crash would.
    pub(crate) fn down(&self) {
        let data = self.data();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }

    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // Waits for the stop, so the directory is removed after the server.
        let data = self.data();
        let _ = self
            .command("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// The output of a tool that must have succeeded.
fn succeeded(tool: &str, output: std::io::Result<Output>) -> String {
    let out = output.unwrap_or_else(|e| panic!("running {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
