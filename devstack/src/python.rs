//! A Python virtual environment with the packages the tests check Clisonix against
//! (`tests/python/requirements.txt`: independent implementations such as fastavro),
//! made once from PyPI into the cache, one per version of the requirements.
//! `./dev test` makes it and hands its interpreter to the tests as `CLISONIX_PYTHON`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use crate::procs;

/// The tests' Python environment.
#[derive(Debug, Clone)]
pub struct Python {
    requirements: PathBuf,
    cache: PathBuf,
}

impl Python {
    pub fn new(root: &Path, cache: &Path) -> Python {
        Python {
            requirements: root.join("tests/python/requirements.txt"),
            cache: cache.to_owned(),
        }
    }

    fn dir(&self) -> anyhow::Result<PathBuf> {
        let text = fs::read(&self.requirements)
            .with_context(|| format!("reading {}", self.requirements.display()))?;
        let digest = Sha256::digest(&text);
        Ok(self
            .cache
            .join(format!("python-{}", hex::encode(&digest[..6]))))
    }

    /// The environment's interpreter (`CLISONIX_PYTHON`), whether it exists or not.
    pub fn interpreter(&self) -> anyhow::Result<PathBuf> {
        Ok(self.dir()?.join("bin/python"))
    }

    /// Makes the environment unless it exists; answers its interpreter.
    pub fn ensure(&self) -> anyhow::Result<PathBuf> {
        let dir = self.dir()?;
        let python = dir.join("bin/python");
        let done = dir.join(".complete");
        if done.is_file() && python.is_file() {
            return Ok(python);
        }
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        fs::create_dir_all(&self.cache)?;
        let system = std::env::var("CLISONIX_SYSTEM_PYTHON").unwrap_or_else(|_| "python3".into());
        eprintln!(
            "==> Making the tests' Python environment from PyPI into {} (first run only)...",
            dir.display()
        );
        let log = self.cache.join("python-install.log");
        let run = |cmd: &mut Command, what: &str| -> anyhow::Result<()> {
            let status = cmd
                .stdin(Stdio::null())
                .stdout(fs::File::create(&log)?)
                .stderr(Stdio::from(fs::File::options().append(true).open(&log)?))
                .status()
                .with_context(|| format!("running {what}"))?;
            if !status.success() {
                bail!(
                    "{what} failed ({status}); its log is {}:\n{}",
                    log.display(),
                    procs::tail(&log, 20)
                );
            }
            Ok(())
        };
        run(
            Command::new(&system).args(["-m", "venv"]).arg(&dir),
            &format!("{system} -m venv (Python 3 with venv is needed)"),
        )?;
        run(
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "-r",
                ])
                .arg(&self.requirements),
            "pip install -r tests/python/requirements.txt",
        )?;
        fs::write(&done, b"")?;
        eprintln!("==> The tests' Python environment is ready.");
        Ok(python)
    }
}
