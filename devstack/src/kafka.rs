//! The local Apache Kafka node: one broker+controller in KRaft mode on loopback.
//!
//! The official server artifacts (`org.apache.kafka:kafka_2.13`, a pinned version) are
//! fetched once from Maven Central with Maven into a cache folder shared by every
//! checkout, then run on the machine's JDK. The node's data lives in `.dev/kafka` of the
//! checkout and survives restarts until `./dev reset`.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clisonix_topics::{Admin, KafkaSettings};

use crate::procs;

/// The pinned Kafka version.
pub const VERSION: &str = "4.1.1";
/// Scala build of the server artifact.
const SCALA: &str = "2.13";
/// The log4j binding Kafka's slf4j logging needs at runtime.
const LOG4J: &str = "2.24.3";
/// Process marker used to recognise our broker.
const MAIN_CLASS: &str = "kafka.Kafka";

#[derive(Debug, Clone)]
pub struct KafkaNode {
    /// `.dev/kafka` of the checkout.
    pub dir: PathBuf,
    /// Cached server libraries, shared by checkouts.
    pub cache: PathBuf,
    pub port: u16,
    pub controller_port: u16,
    /// Extra JVM options (`CLISONIX_KAFKA_JAVA_OPTS`), after ours, so they win.
    pub java_options: Vec<String>,
}

/// The broker's JVM options. A 1 GiB heap, G1 with Kafka's pause goal, and only the
/// quick JIT compiler (C1): a development broker lives for a session or a CI run on a
/// small machine, and the optimising compiler (C2) kept compiling its produce path for
/// minutes, taking 4–6 s of CPU in the ingest benchmark and up to half a core in its
/// last rounds. The broker's time goes mostly to copies, CRCs and system calls, which
/// C2 does not speed up: with C1 only, the raw producer's CPU per frame was the same
/// (README, "Benchmarks"). `-XX:TieredStopAtLevel=4` in `CLISONIX_KAFKA_JAVA_OPTS`
/// brings C2 back.
const JAVA_OPTIONS: &[&str] = &[
    "-Xms256m",
    "-Xmx1g",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
];

impl KafkaNode {
    /// The JVM's options: ours, then the user's.
    fn java_args(&self) -> Vec<String> {
        JAVA_OPTIONS
            .iter()
            .map(|o| o.to_string())
            .chain(self.java_options.iter().cloned())
            .collect()
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn libs(&self) -> PathBuf {
        self.cache.join("libs")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("kafka.pid")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("kafka.log")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn properties(&self) -> PathBuf {
        self.dir.join("server.properties")
    }

    /// The broker's pid, when it runs.
    pub fn running(&self) -> Option<i32> {
        procs::read_pid(&self.pid_file()).filter(|&pid| procs::alive(pid, &self.marker()))
    }

    fn marker(&self) -> String {
        // The properties path is unique to this checkout.
        self.properties().display().to_string()
    }

    /// Fetches the server once into the cache (a visible message while it runs).
    pub fn fetch(&self) -> anyhow::Result<()> {
        let done = self.cache.join(".complete");
        if done.exists() {
            return Ok(());
        }
        which("mvn").with_context(|| {
            "Maven (mvn) is needed once, to fetch Apache Kafka from Maven Central. \
             Install it (apt-get install maven), or point CLISONIX_KAFKA_BOOTSTRAP at a running Kafka."
        })?;
        fs::create_dir_all(&self.cache)
            .with_context(|| format!("creating {}", self.cache.display()))?;
        eprintln!(
            "==> Fetching Apache Kafka {VERSION} from Maven Central into {} (first run only, about 45 MB)...",
            self.cache.display()
        );
        let pom = self.cache.join("pom.xml");
        fs::write(&pom, pom_xml())?;
        let staging = self.cache.join("libs.partial");
        let _ = fs::remove_dir_all(&staging);
        let log = self.cache.join("fetch.log");
        let status = Command::new("mvn")
            .args(["-B", "-q", "-f"])
            .arg(&pom)
            .arg("dependency:copy-dependencies")
            .arg(format!("-DoutputDirectory={}", staging.display()))
            .arg("-DincludeScope=runtime")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(Stdio::from(fs::File::options().append(true).open(&log)?))
            .status()
            .context("running mvn")?;
        if !status.success() {
            bail!(
                "fetching Kafka with Maven failed ({status}); its log is {}:\n{}",
                log.display(),
                procs::tail(&log, 20)
            );
        }
        let _ = fs::remove_dir_all(self.libs());
        fs::rename(&staging, self.libs())?;
        fs::write(&done, VERSION)?;
        eprintln!("==> Kafka {VERSION} fetched.");
        Ok(())
    }

    /// Writes the configuration and formats the storage, once.
    fn format(&self) -> anyhow::Result<()> {
        fs::create_dir_all(&self.dir)?;
        fs::write(self.properties(), self.server_properties())?;
        fs::write(self.dir.join("log4j2.properties"), LOG4J_PROPERTIES)?;
        if self.data_dir().join("meta.properties").exists() {
            return Ok(());
        }
        let cluster_id = cluster_id();
        let output = Command::new("java")
            .arg("-cp")
            .arg(format!("{}/*", self.libs().display()))
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.join("log4j2.properties").display()
            ))
            .args(["kafka.tools.StorageTool", "format", "--config"])
            .arg(self.properties())
            .args(["--cluster-id", &cluster_id])
            .output()
            .context("running Kafka's storage format tool")?;
        if !output.status.success() {
            bail!(
                "formatting Kafka's storage failed:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    fn server_properties(&self) -> String {
        format!(
            "# Generated by ./dev: a single Apache Kafka node in KRaft mode, for development.\n\
             process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{controller}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             log.dirs={data}\n\
             num.partitions=1\n\
             # The catalog is the truth: topics are created by clisonix-topics, never by accident.\n\
             auto.create.topics.enable=false\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=10\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=10\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             # New consumer groups start at once (tests create many).\n\
             group.initial.rebalance.delay.ms=0\n\
             log.retention.check.interval.ms=60000\n",
            port = self.port,
            controller = self.controller_port,
            data = self.data_dir().display(),
        )
    }

    /// Starts the node unless it runs, and waits until it serves metadata.
    pub fn start(&self) -> anyhow::Result<bool> {
        if self.running().is_some() {
            return Ok(false);
        }
        check_java()?;
        self.fetch()?;
        procs::ensure_port_free(self.port, "the Kafka broker", "CLISONIX_KAFKA_PORT")?;
        procs::ensure_port_free(
            self.controller_port,
            "the Kafka controller",
            "CLISONIX_KAFKA_CONTROLLER_PORT",
        )?;
        self.format()?;
        let log = fs::File::create(self.log_file())?;
        let mut child = Command::new("java")
            .args(self.java_args())
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", self.libs().display()))
            .arg(MAIN_CLASS)
            .arg(self.properties())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C meant for ./dev does not kill the broker
            // half-way; ./dev stops it with SIGTERM (a controlled shutdown).
            .process_group(0)
            .spawn()
            .context("starting java")?;
        let pid = child.id() as i32;
        fs::write(self.pid_file(), pid.to_string())?;
        let started = Instant::now();
        let settings = KafkaSettings::new(self.bootstrap(), "clisonix-dev");
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the Kafka broker exited during start-up ({status}); its log is {}:\n{}",
                    self.log_file().display(),
                    procs::tail(&self.log_file(), 30)
                );
            }
            if procs::port_open(self.port) && Admin::connect(&settings).is_ok() {
                return Ok(true);
            }
            if started.elapsed() > Duration::from_secs(90) {
                bail!(
                    "the Kafka broker did not become ready within 90 s; its log is {}:\n{}",
                    self.log_file().display(),
                    procs::tail(&self.log_file(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Stops the node (controlled shutdown, then SIGKILL after 60 s).
    pub fn stop(&self) -> anyhow::Result<bool> {
        let Some(pid) = self.running() else {
            let _ = fs::remove_file(self.pid_file());
            return Ok(false);
        };
        let clean = procs::terminate(pid, &self.marker(), Duration::from_secs(60))?;
        let _ = fs::remove_file(self.pid_file());
        if !clean {
            eprintln!("warning: Kafka did not stop within 60 s and was killed");
        }
        Ok(true)
    }

    /// Deletes the node's data (it must be stopped).
    pub fn reset(&self) -> anyhow::Result<()> {
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir)
                .with_context(|| format!("removing {}", self.dir.display()))?;
        }
        Ok(())
    }
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("{program} is not on PATH"))
}

/// Kafka 4 needs Java 17 or newer.
fn check_java() -> anyhow::Result<()> {
    which("java").context(
        "Java 17 or newer is needed to run the Kafka broker. Install it \
         (apt-get install openjdk-17-jre-headless), or point CLISONIX_KAFKA_BOOTSTRAP at a running Kafka.",
    )?;
    let output = Command::new("java").arg("-version").output()?;
    let text = String::from_utf8_lossy(&output.stderr);
    let major = text
        .split('"')
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(m) if m >= 17 => Ok(()),
        _ => bail!(
            "Kafka {VERSION} needs Java 17 or newer; `java -version` says: {}",
            text.lines().next().unwrap_or("nothing")
        ),
    }
}

/// A Kafka cluster id: 16 random bytes in URL-safe base64 without padding.
/// A random cluster id in Kafka's form: a UUID in URL-safe base64, 22 characters. Like
/// Kafka's own `Uuid.randomUuid`, never one that starts with `-`, which the storage
/// tool would read as an option (one id in 64 did, and the broker failed to start).
fn cluster_id() -> String {
    loop {
        let id = base64_id(uuid::Uuid::new_v4().into_bytes());
        if !id.starts_with('-') {
            return id;
        }
    }
}

fn base64_id(bytes: [u8; 16]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = String::new();
    for b in bytes {
        bits = (bits << 8) | u32::from(b);
        nbits += 8;
        while nbits >= 6 {
            nbits -= 6;
            out.push(ALPHABET[((bits >> nbits) & 63) as usize] as char);
        }
    }
    if nbits > 0 {
        out.push(ALPHABET[((bits << (6 - nbits)) & 63) as usize] as char);
    }
    out
}

fn pom_xml() -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by ./dev: resolves the Apache Kafka server and its runtime dependencies. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.clisonix</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{VERSION}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{SCALA}</artifactId>
      <version>{VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{LOG4J}</version>
    </dependency>
  </dependencies>
</project>
"#
    )
}

const LOG4J_PROPERTIES: &str = "\
# Generated by ./dev: warnings and errors, plus the broker's start and stop lines.
rootLogger.level=WARN
rootLogger.appenderRef.stdout.ref=STDOUT
appender.stdout.type=Console
appender.stdout.name=STDOUT
appender.stdout.layout.type=PatternLayout
appender.stdout.layout.pattern=[%d] %p %m (%c)%n
logger.server.name=kafka.server.KafkaRaftServer
logger.server.level=INFO
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_are_22_url_safe_characters() {
        let id = cluster_id();
        assert_eq!(id.len(), 22);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(id, cluster_id());
        assert!((0..10_000).all(|_| !cluster_id().starts_with('-')));
        // The encoding itself: 0xF8 is 111110 00, so `-` and then `A`s.
        let mut bytes = [0u8; 16];
        bytes[0] = 0xF8;
        assert_eq!(base64_id(bytes), format!("-{}", "A".repeat(21)));
    }

    /// A node in `/x/.dev/kafka` on ports 1234 and 1235, without options of the user's.
    fn node() -> KafkaNode {
        KafkaNode {
            dir: PathBuf::from("/x/.dev/kafka"),
            cache: PathBuf::from("/c"),
            port: 1234,
            controller_port: 1235,
            java_options: Vec::new(),
        }
    }

    #[test]
    fn properties_name_the_ports_and_data() {
        let node = node();
        let p = node.server_properties();
        assert!(p.contains("listeners=PLAINTEXT://127.0.0.1:1234,CONTROLLER://127.0.0.1:1235"));
        assert!(p.contains("log.dirs=/x/.dev/kafka/data"));
        assert!(p.contains("controller.quorum.voters=1@127.0.0.1:1235"));
    }

    #[test]
    fn the_users_java_options_come_after_ours_so_they_win() {
        let mut node = node();
        let ours = node.java_args();
        assert!(ours.contains(&"-XX:TieredStopAtLevel=1".to_owned()));
        node.java_options = vec!["-XX:TieredStopAtLevel=4".into(), "-Xmx2g".into()];
        let args = node.java_args();
        assert_eq!(args[..ours.len()], ours[..]);
        assert_eq!(args[ours.len()..], ["-XX:TieredStopAtLevel=4", "-Xmx2g"]);
    }
}
