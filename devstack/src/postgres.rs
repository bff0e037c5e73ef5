//! Postgres for development: the server named by `DATABASE_URL`, or a private cluster
//! in `.dev/postgres` of the checkout, on loopback, started with the system's
//! PostgreSQL server binaries (installed from the system's packages when missing).
//!
//! PostgreSQL refuses to run as root; when ./dev runs as root the cluster is owned by
//! and run as the `postgres` system user that the server package creates.

use std::fs;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};

use crate::procs;

/// The database the services use.
pub const DATABASE: &str = "clisonix";
/// The superuser of the private cluster (trust authentication, loopback only).
pub const USER: &str = "clisonix";

#[derive(Debug, Clone)]
pub enum Postgres {
    /// A server the user runs (`DATABASE_URL`): used as it is, never started or stopped.
    External { url: String },
    /// Our own cluster.
    Private { dir: PathBuf, port: u16 },
}

impl Postgres {
    pub fn url(&self) -> String {
        match self {
            Postgres::External { url } => url.clone(),
            Postgres::Private { port, .. } => {
                format!("postgres://{USER}@127.0.0.1:{port}/{DATABASE}")
            }
        }
    }

    fn data(dir: &Path) -> PathBuf {
        dir.join("data")
    }

    pub fn log_file(&self) -> Option<PathBuf> {
        match self {
            Postgres::External { .. } => None,
            Postgres::Private { dir, .. } => Some(dir.join("postgres.log")),
        }
    }

    /// Whether our private cluster runs (external servers: always assumed to).
    pub fn running(&self) -> bool {
        match self {
            Postgres::External { .. } => true,
            Postgres::Private { dir, port } => {
                let pid_file = Self::data(dir).join("postmaster.pid");
                procs::read_pid(&pid_file).is_some_and(|pid| procs::alive(pid, "postgres"))
                    && procs::port_open(*port)
            }
        }
    }

    /// Starts the private cluster (initialising it the first time). Returns whether
    /// it was started now.
    pub fn start(&self) -> anyhow::Result<bool> {
        let Postgres::Private { dir, port } = self else {
            return Ok(false);
        };
        if self.running() {
            return Ok(false);
        }
        let bin = server_binaries()?;
        let as_root = nix::unistd::geteuid().is_root();
        let data = Self::data(dir);
        fs::create_dir_all(dir)?;
        if as_root {
            let (uid, gid) = postgres_user()?;
            chown(dir, Some(uid), Some(gid))
                .with_context(|| format!("giving {} to the postgres user", dir.display()))?;
            // The server process must be able to reach its data directory.
            let reach = run_as(true, "test").arg("-w").arg(dir).status()?;
            if !reach.success() {
                bail!(
                    "running as root, the private Postgres runs as the `postgres` user, which \
                     cannot reach {} (a parent folder is private). Run ./dev as a normal user, \
                     or set DATABASE_URL to a server you run.",
                    dir.display()
                );
            }
        }
        if !data.join("PG_VERSION").exists() {
            eprintln!(
                "==> Initialising a private Postgres cluster in {}",
                data.display()
            );
            procs::run_checked(
                run_as(as_root, bin.join("initdb"))
                    .arg("-D")
                    .arg(&data)
                    .args(["-U", USER, "--auth=trust", "--encoding=UTF8", "--no-locale"]),
                "initdb",
            )?;
        }
        // Settings are rewritten on every start so a changed port takes effect.
        fs::write(
            data.join("postgresql.auto.conf"),
            format!(
                "# Written by ./dev on every start.\n\
                 listen_addresses = '127.0.0.1'\n\
                 port = {port}\n\
                 unix_socket_directories = ''\n\
                 max_connections = 200\n"
            ),
        )?;
        if as_root {
            let (uid, gid) = postgres_user()?;
            chown(data.join("postgresql.auto.conf"), Some(uid), Some(gid))?;
        }
        procs::ensure_port_free(*port, "Postgres", "CLISONIX_PG_PORT")?;
        let log = self.log_file().expect("private");
        procs::run_checked(
            run_as(as_root, bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "start"])
                .stdin(Stdio::null()),
            "starting Postgres",
        )
        .with_context(|| format!("Postgres log:\n{}", procs::tail(&log, 20)))?;
        Ok(true)
    }

    /// Stops the private cluster (fast shutdown: sessions end, data is safe).
    pub fn stop(&self) -> anyhow::Result<bool> {
        let Postgres::Private { dir, .. } = self else {
            return Ok(false);
        };
        if !self.running() {
            return Ok(false);
        }
        let bin = server_binaries()?;
        procs::run_checked(
            run_as(nix::unistd::geteuid().is_root(), bin.join("pg_ctl"))
                .arg("-D")
                .arg(Self::data(dir))
                .args(["-m", "fast", "-w", "-t", "60", "stop"]),
            "stopping Postgres",
        )?;
        Ok(true)
    }

    /// Deletes the private cluster (it must be stopped).
    pub fn reset(&self) -> anyhow::Result<()> {
        if let Postgres::Private { dir, .. } = self {
            if dir.exists() {
                fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
            }
        }
        Ok(())
    }

    /// Creates the services' database when missing, then applies the migrations.
    pub async fn prepare(&self, migrations: &Path) -> anyhow::Result<()> {
        if let Postgres::Private { port, .. } = self {
            let admin_url = format!("postgres://{USER}@127.0.0.1:{port}/postgres");
            let mut conn = PgConnection::connect(&admin_url)
                .await
                .context("connecting to the private Postgres")?;
            let exists: Option<i32> =
                sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
                    .bind(DATABASE)
                    .fetch_optional(&mut conn)
                    .await?;
            if exists.is_none() {
                // DATABASE is a constant identifier; CREATE DATABASE takes no bind parameters.
                sqlx::query("CREATE DATABASE clisonix")
                    .execute(&mut conn)
                    .await?;
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.url())
            .await
            .with_context(|| format!("connecting to {}", redact(&self.url())))?;
        sqlx::migrate::Migrator::new(migrations)
            .await
            .with_context(|| format!("reading migrations in {}", migrations.display()))?
            .run(&pool)
            .await
            .context("applying the database migrations")?;
        pool.close().await;
        Ok(())
    }
}

/// A connection URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// A command for `program`, run as the `postgres` user when we are root.
fn run_as(as_root: bool, program: impl AsRef<std::ffi::OsStr>) -> Command {
    if as_root {
        let mut wrapped = Command::new("runuser");
        wrapped.args(["-u", "postgres", "--"]).arg(program);
        wrapped
    } else {
        Command::new(program)
    }
}

fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"postgres") && f.len() > 3)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .context(
            "running as root needs the `postgres` system user (created by the postgresql package)",
        )
}

/// The folder holding `initdb` and `pg_ctl`, installing the server when missing.
fn server_binaries() -> anyhow::Result<PathBuf> {
    if let Some(dir) = find_server() {
        return Ok(dir);
    }
    eprintln!("==> The PostgreSQL server is not installed; installing it from the system's packages (apt-get install postgresql)...");
    let root = nix::unistd::geteuid().is_root();
    let apt = |args: &[&str]| -> anyhow::Result<bool> {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.args(["-n", "apt-get"]);
            c
        };
        Ok(cmd
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false))
    };
    let installed = apt(&["install", "-y", "-q", "postgresql"])?
        || (apt(&["update", "-q"])? && apt(&["install", "-y", "-q", "postgresql"])?);
    match find_server() {
        Some(dir) if installed => Ok(dir),
        _ => bail!(
            "the PostgreSQL server is missing and could not be installed{}. Install it \
             (apt-get install postgresql), or set DATABASE_URL to a server you run.",
            if root {
                ""
            } else {
                " (no root, and sudo needs a password)"
            }
        ),
    }
}

fn find_server() -> Option<PathBuf> {
    let has = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    // Debian keeps server binaries out of PATH, one folder per major version.
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, bin)| has(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).find(|dir| has(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact("postgres://db/x"), "postgres://db/x");
    }

    #[test]
    fn private_url_points_at_the_private_port() {
        let pg = Postgres::Private {
            dir: PathBuf::from("/tmp/x"),
            port: 15432,
        };
        assert_eq!(pg.url(), "postgres://clisonix@127.0.0.1:15432/clisonix");
    }
}

/// A Postgres cluster of one test's own (the cached server, on `port`, its database
/// migrated), for tests that stop and start Postgres without disturbing the others;
/// stopped and deleted when dropped. A test helper: it panics when the cluster cannot
/// start or stop.
#[derive(Debug)]
pub struct PrivatePostgres {
    cluster: Postgres,
    dir: PathBuf,
}

impl PrivatePostgres {
    pub async fn start(port: u16) -> PrivatePostgres {
        let dir = std::env::temp_dir().join(format!(
            "clisonix-private-pg-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        let cluster = Postgres::Private {
            dir: dir.clone(),
            port,
        };
        let pg = PrivatePostgres { cluster, dir };
        pg.up().await;
        pg.cluster
            .prepare(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/migrations"))
            .await
            .expect("the private database is migrated");
        pg
    }

    pub fn url(&self) -> String {
        self.cluster.url()
    }

    /// Starts the cluster again (waits until it accepts connections).
    pub async fn up(&self) {
        let cluster = self.cluster.clone();
        tokio::task::spawn_blocking(move || cluster.start())
            .await
            .unwrap()
            .expect("the private Postgres starts");
    }

    /// Stops the cluster (a fast shutdown: its sessions end).
    pub async fn down(&self) {
        let cluster = self.cluster.clone();
        tokio::task::spawn_blocking(move || cluster.stop())
            .await
            .unwrap()
            .expect("the private Postgres stops");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.cluster.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
