//! The `clisonix-topics` command line against the real broker (`./dev test`).

use std::process::Command;

fn bootstrap() -> String {
    std::env::var("CLISONIX_KAFKA_BOOTSTRAP")
        .expect("CLISONIX_KAFKA_BOOTSTRAP is not set: run the tests with ./dev test")
}

fn topics(prefix: &str, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_clisonix-topics"))
        .args(["--bootstrap", &bootstrap(), "--prefix", prefix])
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn help_shows_examples() {
    let output = Command::new(env!("CARGO_BIN_EXE_clisonix-topics"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(text.contains("Examples:") && text.contains("clisonix-topics describe eeg.frames"));
}

#[test]
fn every_subcommand_has_help_with_examples() {
    for sub in [
        "consume",
        "lag",
        "reset-offsets",
        "diff",
        "export",
        "schemas",
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_clisonix-topics"))
            .args([sub, "--help"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{sub}");
        assert!(
            text.contains("Examples:") && text.contains(&format!("clisonix-topics {sub}")),
            "{sub}: {text}"
        );
    }
    // A bad argument is a usage error (2) that names it.
    let output = Command::new(env!("CARGO_BIN_EXE_clisonix-topics"))
        .args(["consume", "eeg.frames", "--limit", "many"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--limit"));
}

#[test]
fn create_is_idempotent_and_rejects_impossible_replication() {
    let prefix = format!("cli-{}.", &uuid_hex()[..8]);
    let (code, out, err) = topics(&prefix, &["create"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("created").count(), 6, "{out}");
    let (code, out, _) = topics(&prefix, &["create"]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("ok ").count(), 6, "{out}");

    // The same catalog names under another prefix, one pre-made with other settings.
    let other = format!("cli-{}.", &uuid_hex()[..8]);
    let (code, out, _) = topics(&other, &["create", "--replication-factor", "1"]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = topics(&other, &["describe", &format!("{other}eeg.frames")]);
    assert_eq!(code, 0);
    assert!(
        out.contains("cleanup.policy=delete") && out.contains("partition"),
        "{out}"
    );

    let (code, _, err) = topics(&prefix, &["create", "--replication-factor", "3"]);
    assert_eq!(
        code, 1,
        "three replicas cannot be placed on one broker: {err}"
    );
    assert!(err.contains("replication factor 3"), "{err}");

    let (code, out, _) = topics(&prefix, &["list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("{prefix}eeg.frames")) && out.contains("yes"),
        "{out}"
    );
}

#[test]
fn a_conflicting_topic_exits_with_2() {
    let prefix = format!("cli-{}.", &uuid_hex()[..8]);
    // Make eeg.sessions exist with the wrong cleanup policy, using kafka's own admin
    // through our library's settings.
    let settings = clisonix_topics::KafkaSettings::new(bootstrap(), "cli-test");
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        settings.admin().create().unwrap();
    let name = format!("{prefix}eeg.sessions");
    let topic = rdkafka::admin::NewTopic::new(&name, 6, rdkafka::admin::TopicReplication::Fixed(1))
        .set("cleanup.policy", "delete");
    let results = futures::executor::block_on(
        admin.create_topics([&topic], &rdkafka::admin::AdminOptions::new()),
    )
    .unwrap();
    assert!(results[0].is_ok());
    let (code, out, err) = topics(&prefix, &["create"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        out.contains("CONFLICT")
            && out.contains("cleanup.policy: catalog says compact, topic has delete"),
        "{out}"
    );
    assert!(err.contains("nothing was changed"), "{err}");
}

fn uuid_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
