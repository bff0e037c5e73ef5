//! stripe-mock, Stripe's own API simulator (`github.com/stripe/stripe-mock`), on
//! loopback: what the gateway's Stripe calls are tested against.
//!
//! A pinned version is built once with the machine's Go from the Go module proxy into
//! the cache shared by checkouts, then run from there. It validates requests against
//! Stripe's OpenAPI description and answers canned objects; it keeps no state and sends
//! no webhooks.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::procs;

/// The pinned version.
pub const VERSION: &str = "v0.203.0";
const MODULE: &str = "github.com/stripe/stripe-mock";

#[derive(Debug, Clone)]
pub struct StripeMock {
    /// `.dev/stripe-mock` of the checkout (pid and log).
    pub dir: PathBuf,
    /// The built binary's folder, shared by checkouts.
    pub cache: PathBuf,
    pub port: u16,
}

impl StripeMock {
    /// The API base URL programs use (`CLISONIX_STRIPE_API_BASE`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn binary(&self) -> PathBuf {
        self.cache.join("bin/stripe-mock")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("stripe-mock.pid")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("stripe-mock.log")
    }

    /// Recognises our process among others.
    fn marker(&self) -> String {
        format!("stripe-mock -http-addr 127.0.0.1:{}", self.port)
    }

    /// Its pid, when it runs.
    pub fn running(&self) -> Option<i32> {
        procs::read_pid(&self.pid_file()).filter(|&pid| procs::alive(pid, &self.marker()))
    }

    /// Builds it once into the cache (a visible message while it runs).
    pub fn fetch(&self) -> anyhow::Result<()> {
        if self.binary().is_file() {
            return Ok(());
        }
        let go = Command::new("go").arg("version").output();
        if !go.is_ok_and(|o| o.status.success()) {
            bail!(
                "Go is needed once, to build stripe-mock from the Go module proxy. \
                 Install it (apt-get install golang-go)."
            );
        }
        fs::create_dir_all(&self.cache)
            .with_context(|| format!("creating {}", self.cache.display()))?;
        eprintln!(
            "==> Building stripe-mock {VERSION} from the Go module proxy into {} (first run only, about a minute)...",
            self.cache.display()
        );
        let log = self.cache.join("build.log");
        let status = Command::new("go")
            .args(["install", &format!("{MODULE}@{VERSION}")])
            .env("GOBIN", self.cache.join("bin"))
            .env("GOPATH", self.cache.join("gopath"))
            .env("GOFLAGS", "-modcacherw")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(Stdio::from(fs::File::options().append(true).open(&log)?))
            .status()
            .context("running go install")?;
        if !status.success() || !self.binary().is_file() {
            bail!(
                "building stripe-mock failed ({status}); its log is {}:\n{}",
                log.display(),
                procs::tail(&log, 20)
            );
        }
        eprintln!("==> stripe-mock {VERSION} built.");
        Ok(())
    }

    /// Starts it unless it runs, and waits until it answers.
    pub fn start(&self) -> anyhow::Result<bool> {
        if self.running().is_some() {
            return Ok(false);
        }
        self.fetch()?;
        procs::ensure_port_free(self.port, "stripe-mock", "CLISONIX_STRIPE_MOCK_PORT")?;
        fs::create_dir_all(&self.dir)?;
        let log = fs::File::create(self.log_file())?;
        // It always serves HTTPS too (on every interface, port 12112, unless told
        // otherwise): a Unix socket in the checkout keeps that off the network.
        let socket = self.dir.join("https.sock");
        let _ = fs::remove_file(&socket);
        let mut child = Command::new(self.binary())
            .arg("-http-addr")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("-https-unix")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting stripe-mock")?;
        fs::write(self.pid_file(), child.id().to_string())?;
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "stripe-mock exited during start-up ({status}); its log is {}:\n{}",
                    self.log_file().display(),
                    procs::tail(&self.log_file(), 20)
                );
            }
            if procs::port_open(self.port) {
                return Ok(true);
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("stripe-mock did not listen within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&self) -> anyhow::Result<bool> {
        let Some(pid) = self.running() else {
            let _ = fs::remove_file(self.pid_file());
            return Ok(false);
        };
        procs::terminate(pid, &self.marker(), Duration::from_secs(10))?;
        let _ = fs::remove_file(self.pid_file());
        Ok(true)
    }
}
