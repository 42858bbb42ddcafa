//! The audit log end to end: what `GET /v1/audit` answers (filters, cursor, bounds), the
//! tag chain that `audit verify` checks (clean, altered, removed, pruned), retention on
//! the injected clock, `audit export` and SIGKILL in the middle of a burst of audited
//! actions against the real binary.
//!
//! Tampering is done the way an attacker holding the data file but not the master key
//! would: the closed file is opened with `redb` directly and one row is changed or
//! deleted. Verification then runs twice, through `AuditLog::verify_report` on the file
//! opened offline and through the real `gatehouse audit verify`.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gatehouse::audit::{
    AuditLog, Event, EventView, MAX_PAGE, Origin, PRUNE_CHUNK, Query, VerifyReport,
};
use gatehouse::clock::{FixedClock, SharedClock};
use gatehouse::store::Store;
use gatehouse::store::seal::MasterKey;
// The audit tables as the data file lays them out (schema/data-file.md), for tests that
// damage the file on purpose.
const AUDIT_EVENTS: redb::TableDefinition<u64, &[u8]> =
    redb::TableDefinition::new("audit_events.v1");
const AUDIT_CHECKPOINT: redb::TableDefinition<&str, &[u8]> =
    redb::TableDefinition::new("audit_checkpoint.v1");
const AUDIT_CHECKPOINT_KEY: &str = "checkpoint";
use redb::ReadableTable;
use serde_json::{Value, json};

use crate::binary::{Api, Finished, Server, gatehouse, key_path, run, serve_cmd};
use crate::helpers::{self, TEST_NOW_MS, TestApp};

const DAY_MS: u64 = 24 * 3600 * 1000;

// ---------------------------------------------------------------------------------------
// Helpers shared with `lockout.rs`

/// Every event of the log matching `kind` (a type or a family), oldest first, paging
/// through the whole log.
pub(crate) fn events(app: &TestApp, kind: Option<&str>) -> Vec<EventView> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = app
            .running
            .services
            .audit
            .query(&Query {
                after,
                kind: kind.map(str::to_string),
                device: None,
                limit: MAX_PAGE,
            })
            .expect("audit query");
        if let Some(last) = page.events.last() {
            after = last.seq;
        }
        out.extend(page.events);
        match page.next {
            Some(next) => after = after.max(next),
            None => return out,
        }
    }
}

/// The events of type `kind` whose details hold `key: value`.
pub(crate) fn events_with(app: &TestApp, kind: &str, key: &str, value: &str) -> Vec<EventView> {
    events(app, Some(kind))
        .into_iter()
        .filter(|e| e.details[key] == value)
        .collect()
}

/// Runs the real binary on `data` with `args` (blocking work, off the runtime: the
/// command may talk to this test's in-process server over the admin socket).
pub(crate) async fn run_cli(data: &Path, args: &[&str]) -> Finished {
    let mut cmd: Command = gatehouse(data);
    cmd.args(args);
    tokio::task::spawn_blocking(move || run(cmd))
        .await
        .expect("the command runner panicked")
}

/// `run_cli`, which must exit 0.
pub(crate) async fn run_cli_ok(data: &Path, args: &[&str]) -> Finished {
    let done = run_cli(data, args).await;
    assert!(
        done.status.success(),
        "gatehouse {args:?} failed ({}); stdout:\n{}\nstderr:\n{}",
        done.status,
        done.stdout,
        done.stderr
    );
    done
}

/// Writes straight into the closed data file, bypassing every gatehouse check.
fn raw_edit(data: &Path, edit: impl FnOnce(&redb::WriteTransaction)) {
    let db = redb::Database::open(data).expect("the data file opens with redb");
    let tx = db.begin_write().expect("write transaction");
    edit(&tx);
    tx.commit().expect("commit");
}

/// `AuditLog::verify_report` over the closed data file, opened with its default key, and
/// the events it still decodes.
fn offline_verify(data: &Path) -> (VerifyReport, Vec<EventView>) {
    let key = MasterKey::load(&key_path(data)).expect("master key loads");
    let clock: SharedClock = Arc::new(FixedClock::new(TEST_NOW_MS));
    let (store, _) = Store::open(data, &key, clock.as_ref()).expect("data file opens");
    let log = AuditLog::new(store.clone(), clock, Duration::from_secs(90 * 24 * 3600));
    let report = log.verify_report(&mut |_, _| {}).expect("verify runs");
    let page = log
        .query(&Query {
            limit: MAX_PAGE,
            ..Query::default()
        })
        .expect("query");
    store.close();
    (report, page.events)
}

/// A server with a few audited actions of different kinds behind it: two paired
/// devices, three named pairing sessions, a rename and a revocation.
async fn busy_app() -> (TestApp, [String; 2]) {
    let app = helpers::spawn_app().await;
    let a = app.pair_device().await.device_id;
    let b = app.pair_device().await.device_id;
    for name in ["alpha", "tamper-me", "omega"] {
        open_named_session(&app, name).await;
    }
    let renamed = app
        .client()
        .patch(app.url(&format!("/v1/devices/{a}")))
        .bearer_auth(app.admin_token())
        .json(&json!({"name": "Ada's phone"}))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), 200, "rename");
    let revoked = app
        .client()
        .delete(app.url(&format!("/v1/devices/{b}")))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200, "revoke");
    // The admin token's first use of the (fixed) minute writes `login.succeeded` in the
    // background; once it is there, no request of this test adds another.
    let deadline = Instant::now() + Duration::from_secs(5);
    while events(&app, Some("login.succeeded")).is_empty() {
        assert!(
            Instant::now() < deadline,
            "login.succeeded was never written"
        );
        tokio::task::yield_now().await;
    }
    (app, [a, b])
}

/// Opens a pairing session named `name` as the admin; its session id.
async fn open_named_session(app: &TestApp, name: &str) -> String {
    let response = app
        .client()
        .post(app.url("/v1/pairing/sessions"))
        .bearer_auth(app.admin_token())
        .json(&json!({ "name": name }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "pairing session {name}");
    let body: Value = response.json().await.unwrap();
    body["session_id"].as_str().unwrap().to_string()
}

/// `GET /v1/audit?{query}` as `token` (none: no Authorization header).
async fn get_audit(app: &TestApp, token: Option<&str>, query: &str) -> (u16, Value) {
    let mut request = app.client().get(app.url(&format!("/v1/audit?{query}")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// The events of a `GET /v1/audit` answer.
fn page_events(body: &Value) -> Vec<EventView> {
    serde_json::from_value(body["events"].clone())
        .unwrap_or_else(|e| panic!("not a page of events ({e}): {body}"))
}

fn seq_of_session(app: &TestApp, name: &str) -> u64 {
    let found = events_with(app, "pairing.created", "name", name);
    assert_eq!(
        found.len(),
        1,
        "one pairing.created named {name}: {found:?}"
    );
    found[0].seq
}

// ---------------------------------------------------------------------------------------
// GET /v1/audit

#[tokio::test]
async fn audit_api_filters_by_type_family_and_device() {
    let (app, [a, b]) = busy_app().await;
    let admin = app.admin_token();
    let admin_id = app.running.bootstrap_token.as_ref().unwrap().id.clone();

    let (status, body) = get_audit(&app, Some(&admin), "type=device.revoked").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["next"], Value::Null, "{body}");
    let revoked = body["events"].as_array().unwrap();
    assert_eq!(revoked.len(), 1, "{body}");
    let event = &revoked[0];
    let keys: BTreeSet<&str> = event
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "seq",
            "time",
            "type",
            "severity",
            "actor",
            "source",
            "request_id",
            "outcome",
            "device",
            "details"
        ]),
        "{event}"
    );
    assert_eq!(event["type"], "device.revoked");
    assert_eq!(event["device"], b.as_str());
    assert_eq!(event["severity"], "notice");
    assert_eq!(event["outcome"], "success");
    assert_eq!(event["actor"], format!("admin:{admin_id}"));
    assert_eq!(event["source"], "127.0.0.1");
    assert!(
        event["request_id"].as_str().is_some_and(|r| !r.is_empty()),
        "{event}"
    );
    assert_eq!(event["time"], "2026-11-23T00:00:00Z");
    assert_eq!(event["details"]["families_revoked"], 1, "{event}");

    // A family, in both spellings.
    for family in ["device.*", "device."] {
        let (status, body) = get_audit(&app, Some(&admin), &format!("type={family}")).await;
        assert_eq!(status, 200, "{body}");
        let found: Vec<(String, Option<String>)> = page_events(&body)
            .into_iter()
            .map(|e| (e.kind, e.device))
            .collect();
        assert_eq!(
            found,
            [
                ("device.renamed".to_string(), Some(a.clone())),
                ("device.revoked".to_string(), Some(b.clone())),
            ],
            "type={family}"
        );
    }
    // `device` is not a family without its dot.
    let (status, body) = get_audit(&app, Some(&admin), "type=device").await;
    assert_eq!(status, 200);
    assert_eq!(page_events(&body), []);

    // Everything about device A, and only that.
    let (status, body) = get_audit(&app, Some(&admin), &format!("device={a}")).await;
    assert_eq!(status, 200, "{body}");
    let about_a = page_events(&body);
    let kinds: Vec<&str> = about_a.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["pairing.claimed", "token.issued", "device.renamed"]);
    assert!(
        about_a
            .iter()
            .all(|e| e.device.as_deref() == Some(a.as_str()))
    );
    assert_eq!(
        about_a[2].details,
        json!({"from": "Pixel", "to": "Ada's phone"})
    );

    // Type and device together.
    let (status, body) = get_audit(&app, Some(&admin), &format!("type=token.*&device={b}")).await;
    assert_eq!(status, 200, "{body}");
    let tokens_of_b = page_events(&body);
    assert_eq!(tokens_of_b.len(), 1, "{body}");
    assert_eq!(tokens_of_b[0].kind, "token.issued");
    assert_eq!(tokens_of_b[0].device.as_deref(), Some(b.as_str()));
    assert_eq!(tokens_of_b[0].actor, format!("device:{b}"));
    app.stop().await;
}

#[tokio::test]
async fn audit_api_pages_with_a_cursor() {
    let (app, _) = busy_app().await;
    let admin = app.admin_token();
    // The first admin request of a minute writes `login.succeeded`: done before the log
    // is read, so it stands still while it is paged.
    let (status, _) = get_audit(&app, Some(&admin), "limit=1").await;
    assert_eq!(status, 200);

    let (status, body) = get_audit(&app, Some(&admin), "limit=1000").await;
    assert_eq!(status, 200);
    assert_eq!(body["next"], Value::Null);
    let all = page_events(&body);
    assert!(all.len() > 10, "a busy log: {}", all.len());
    assert_eq!(all, events(&app, None), "the API and the library agree");
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "oldest first");

    let mut paged = Vec::new();
    let mut after = 0;
    let mut pages = 0;
    loop {
        let (status, body) = get_audit(&app, Some(&admin), &format!("limit=3&after={after}")).await;
        assert_eq!(status, 200, "{body}");
        pages += 1;
        let page = page_events(&body);
        assert!(page.len() <= 3, "{body}");
        assert!(page.iter().all(|e| e.seq > after), "after={after}: {body}");
        paged.extend(page.clone());
        match body["next"].as_u64() {
            Some(next) => {
                assert_eq!(page.len(), 3, "only a full page has a next: {body}");
                assert_eq!(next, page[2].seq, "next is the last seq seen");
                after = next;
            }
            None => break,
        }
        assert!(pages < 100, "paging does not end");
    }
    assert_eq!(paged, all, "the pages add up to the whole log");
    assert_eq!(pages, all.len().div_ceil(3));

    // A cursor with a filter skips what does not match.
    let renamed = all.iter().find(|e| e.kind == "device.renamed").unwrap().seq;
    let (status, body) = get_audit(
        &app,
        Some(&admin),
        &format!("type=device.*&after={renamed}"),
    )
    .await;
    assert_eq!(status, 200);
    let rest: Vec<String> = page_events(&body).into_iter().map(|e| e.kind).collect();
    assert_eq!(rest, ["device.revoked"]);
    app.stop().await;
}

#[tokio::test]
async fn audit_api_refuses_bad_queries_and_non_admins() {
    let app = helpers::spawn_app().await;
    let admin = app.admin_token();
    for query in [
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=ten",
        "after=-1",
        "foo=1",
        "type=Device.Revoked",
        "type=",
        "type=device%20revoked",
        "device=dev_123",
        "device=ps_00000000000000000000000000000000",
    ] {
        let (status, body) = get_audit(&app, Some(&admin), query).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"], "invalid_request", "{query}: {body}");
    }
    for query in ["limit=1", "limit=1000", "type=pairing.*&limit=5&after=1"] {
        let (status, body) = get_audit(&app, Some(&admin), query).await;
        assert_eq!(status, 200, "{query}: {body}");
    }

    let response = app.client().get(app.url("/v1/audit")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    let (status, body) = get_audit(&app, Some("gha_0000000000000000_nope"), "").await;
    assert_eq!(status, 401, "{body}");
    // A device's access token is no admin token either.
    let device = app.pair_device().await;
    let (status, body) = get_audit(&app, Some(&device.access_token), "").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        events_with(&app, "login.failed", "method", "admin_token").len(),
        2,
        "each refused admin token is recorded"
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// audit verify

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_passes_on_a_clean_log() {
    let (app, _) = busy_app().await;
    let data = app.data_path().to_path_buf();
    let all = events(&app, None);
    let report = app
        .running
        .services
        .audit
        .verify_report(&mut |_, _| {})
        .unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, all.len() as u64);
    assert_eq!(report.first_seq, Some(1));
    assert_eq!(report.last_seq, Some(all.last().unwrap().seq));
    assert_eq!(report.pruned, 0);
    assert_eq!((report.bad_seq, report.problem.as_deref()), (None, None));
    let head = report.head_tag.clone().unwrap();
    assert!(
        head.len() == 64 && head.bytes().all(|b| b.is_ascii_hexdigit()),
        "{head}"
    );

    // The CLI through the running server's admin socket says the same.
    let done = run_cli_ok(&data, &["audit", "verify", "--json"]).await;
    let online: VerifyReport = serde_json::from_str(&done.stdout).unwrap();
    assert_eq!(online, report);

    // And over the closed file.
    let _dir = app.stop().await;
    let done = run_cli_ok(&data, &["audit", "verify"]).await;
    let (offline, _) = offline_verify(&data);
    assert!(offline.ok, "{offline:?}");
    let last = offline.last_seq.unwrap();
    assert_eq!(
        last,
        report.last_seq.unwrap() + 1,
        "service.stopped was added"
    );
    assert!(
        done.stdout.contains(&format!(
            "audit log verified: {last} records (1 to {last}), 0 pruned before them"
        )),
        "{}",
        done.stdout
    );
    assert!(
        done.stdout
            .contains(&format!("head: {last} {}", offline.head_tag.unwrap())),
        "{}",
        done.stdout
    );
}

/// `gatehouse audit verify` on the closed file must fail and name `seq` and `problem`,
/// in text and in JSON.
async fn assert_cli_names(data: &Path, seq: u64, problem: &str) {
    let done = run_cli(data, &["audit", "verify"]).await;
    assert_eq!(done.status.code(), Some(1), "{done:?}");
    assert!(
        done.stderr.contains(&format!(
            "the audit log does not verify: first bad record {seq}: {problem}"
        )),
        "stderr does not name record {seq}: {}",
        done.stderr
    );
    let done = run_cli(data, &["audit", "verify", "--json"]).await;
    assert_eq!(done.status.code(), Some(1), "{done:?}");
    let report: VerifyReport = serde_json::from_str(&done.stdout)
        .unwrap_or_else(|e| panic!("--json prints the report ({e}): {}", done.stdout));
    assert!(!report.ok);
    assert_eq!(report.bad_seq, Some(seq));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_an_altered_record() {
    let (app, _) = busy_app().await;
    let data = app.data_path().to_path_buf();
    let target = seq_of_session(&app, "tamper-me");
    assert!(target > 1);
    let _dir = app.stop().await;

    raw_edit(&data, |tx| {
        let mut table = tx.open_table(AUDIT_EVENTS).unwrap();
        let mut row = table.get(target).unwrap().unwrap().value().to_vec();
        let at = row
            .windows(9)
            .position(|w| w == b"tamper-me")
            .expect("the name is stored in the record");
        // Same length, still UTF-8: the record decodes as before, only its tag is wrong.
        row[at] = b'T';
        table.insert(target, row.as_slice()).unwrap();
    });

    let (report, events) = offline_verify(&data);
    assert!(!report.ok, "{report:?}");
    assert_eq!(report.bad_seq, Some(target), "{report:?}");
    let problem = report.problem.clone().unwrap();
    assert!(
        problem.contains(&format!("record {target} was altered")),
        "{problem}"
    );
    assert_eq!(
        report.records,
        target - 1,
        "every record before it checked out"
    );
    let altered = events.iter().find(|e| e.seq == target).unwrap();
    assert_eq!(
        altered.details["name"], "Tamper-me",
        "the altered record still decodes; only the tag gives it away"
    );

    assert_cli_names(&data, target, &format!("record {target} was altered")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_a_removed_record() {
    let (app, [a, _]) = busy_app().await;
    let data = app.data_path().to_path_buf();
    let renamed = events(&app, Some("device.renamed"));
    assert_eq!(renamed[0].device.as_deref(), Some(a.as_str()));
    let target = renamed[0].seq;
    let _dir = app.stop().await;

    raw_edit(&data, |tx| {
        let mut table = tx.open_table(AUDIT_EVENTS).unwrap();
        assert!(table.remove(target).unwrap().is_some());
    });

    let (report, events) = offline_verify(&data);
    assert!(!report.ok, "{report:?}");
    assert_eq!(report.bad_seq, Some(target), "{report:?}");
    assert_eq!(
        report.problem.as_deref(),
        Some(format!("record {target} is missing").as_str())
    );
    assert!(events.iter().all(|e| e.kind != "device.renamed"));
    assert_cli_names(&data, target, &format!("record {target} is missing")).await;
}

// ---------------------------------------------------------------------------------------
// Retention

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_old_records_behind_a_checked_checkpoint() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_AUDIT_RETENTION", "1d")]).await;
    let data = app.data_path().to_path_buf();
    let audit = &app.running.services.audit;
    // More old records than one chunk, so pruning takes two transactions.
    let filler: Vec<(Origin, Event)> = (0..PRUNE_CHUNK + 7)
        .map(|i| {
            (
                Origin::system(),
                Event::new("config.loaded").detail("filler", i),
            )
        })
        .collect();
    audit.record_many(filler).await.unwrap();
    let old = events(&app, None);
    let old_count = old.len() as u64;
    assert!(old_count > PRUNE_CHUNK);

    // A day and a second later: nothing is old enough yet at exactly one day.
    app.clock.advance_ms(DAY_MS);
    let kept_at_the_edge = audit.prune().await.unwrap();
    assert_eq!(
        kept_at_the_edge.removed, 0,
        "records exactly a day old stay"
    );
    assert!(events(&app, Some("audit.pruned")).is_empty());
    app.clock.advance_ms(1_000);
    let recent = open_named_session(&app, "after the cutoff").await;

    let summary = audit.prune().await.unwrap();
    assert_eq!(summary.removed, old_count);
    assert_eq!(summary.chunks, 2);

    let left = events(&app, None);
    assert_eq!(
        left[0].seq,
        old_count + 1,
        "the oldest kept record follows the pruned"
    );
    assert!(left.iter().all(|e| e.seq > old_count));
    assert!(
        left.iter().all(|e| e.time == "2026-11-24T00:00:01Z"),
        "{left:?}"
    );
    assert_eq!(
        events_with(&app, "pairing.created", "session_id", &recent).len(),
        1
    );
    let pruned = events(&app, Some("audit.pruned"));
    assert_eq!(pruned.len(), 1, "one record for the whole run: {pruned:?}");
    assert_eq!(pruned[0].actor, "system");
    assert_eq!(
        pruned[0].details,
        json!({
            "removed": old_count,
            "before": "2026-11-23T00:00:01Z",
            "retention_days": 1,
        })
    );

    let report = audit.verify_report(&mut |_, _| {}).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.pruned, old_count, "the checkpoint counts the pruned");
    assert_eq!(report.first_seq, Some(old_count + 1));
    assert_eq!(report.records, left.len() as u64);

    // Nothing more to do: no second `audit.pruned`.
    assert_eq!(audit.prune().await.unwrap().removed, 0);
    assert_eq!(events(&app, Some("audit.pruned")).len(), 1);
    let first_kept = left[0].seq;
    let dir = app.stop().await;

    // The CLI agrees before the file is touched.
    let done = run_cli_ok(&data, &["audit", "verify", "--json"]).await;
    let clean: VerifyReport = serde_json::from_str(&done.stdout).unwrap();
    assert!(clean.ok && clean.pruned == old_count, "{clean:?}");

    // The checkpoint itself is covered: altered (a byte of its tag), or removed.
    for (name, edit) in [("altered", true), ("removed", false)] {
        let copy = dir.path().join(format!("checkpoint-{name}.redb"));
        std::fs::copy(&data, &copy).unwrap();
        std::fs::copy(key_path(&data), key_path(&copy)).unwrap();
        raw_edit(&copy, |tx| {
            let mut table = tx.open_table(AUDIT_CHECKPOINT).unwrap();
            if edit {
                let mut row = table
                    .get(AUDIT_CHECKPOINT_KEY)
                    .unwrap()
                    .unwrap()
                    .value()
                    .to_vec();
                *row.last_mut().unwrap() ^= 1;
                table.insert(AUDIT_CHECKPOINT_KEY, row.as_slice()).unwrap();
            } else {
                assert!(table.remove(AUDIT_CHECKPOINT_KEY).unwrap().is_some());
            }
        });
        let (report, _) = offline_verify(&copy);
        let expected = if edit {
            (first_kept, "the pruning checkpoint was altered".to_string())
        } else {
            (1, format!("records 1 to {old_count} are missing"))
        };
        assert_eq!(
            (report.bad_seq, report.problem.clone()),
            (Some(expected.0), Some(expected.1)),
            "checkpoint {name}: {report:?}"
        );
    }

    // Removing the first record after the checkpoint is seen, although nothing is left
    // before it to link to.
    raw_edit(&data, |tx| {
        let mut table = tx.open_table(AUDIT_EVENTS).unwrap();
        assert!(table.remove(first_kept).unwrap().is_some());
    });
    let (report, _) = offline_verify(&data);
    assert!(!report.ok, "{report:?}");
    assert_eq!(report.bad_seq, Some(first_kept), "{report:?}");
    assert_cli_names(
        &data,
        first_kept,
        &format!("record {first_kept} is missing"),
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// audit export, search, tail

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_export_round_trips_every_event_as_json_lines() {
    let (app, [a, _]) = busy_app().await;
    let data = app.data_path().to_path_buf();
    // More than one page of the admin socket's answers, with awkward text in them.
    let filler: Vec<(Origin, Event)> = (0..MAX_PAGE + 200)
        .map(|i| {
            (
                Origin::system(),
                Event::new("config.loaded")
                    .detail("n", i)
                    .detail("text", "quote \" backslash \\ newline \n é ✓"),
            )
        })
        .collect();
    app.running
        .services
        .audit
        .record_many(filler)
        .await
        .unwrap();
    let all = events(&app, None);

    let file = app.dir.path().join("export.jsonl");
    let file_arg = file.to_str().unwrap();
    let done = run_cli_ok(&data, &["audit", "export", "-o", file_arg]).await;
    assert!(
        done.stderr
            .contains(&format!("exported {} events", all.len())),
        "{}",
        done.stderr
    );
    assert!(done.stdout.is_empty(), "{}", done.stdout);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.ends_with('\n'));
    let exported: Vec<EventView> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert_eq!(exported, all, "the export is the log, event for event");

    // An existing file is never overwritten.
    let again = run_cli(&data, &["audit", "export", "-o", file_arg]).await;
    assert!(!again.status.success(), "{again:?}");
    assert!(again.stderr.contains("cannot create"), "{}", again.stderr);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);

    // Filters, to stdout.
    let after = all[all.len() / 2].seq;
    let done = run_cli_ok(
        &data,
        &[
            "audit",
            "export",
            "--type",
            "config.*",
            "--after",
            &after.to_string(),
        ],
    )
    .await;
    let filtered: Vec<EventView> = done
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let expected: Vec<EventView> = all
        .iter()
        .filter(|e| e.seq > after && e.kind.starts_with("config."))
        .cloned()
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(filtered, expected);
    let done = run_cli_ok(&data, &["audit", "export", "--device", &a]).await;
    let kinds: Vec<String> = done
        .stdout
        .lines()
        .map(|line| serde_json::from_str::<EventView>(line).unwrap().kind)
        .collect();
    assert_eq!(kinds, ["pairing.claimed", "token.issued", "device.renamed"]);

    // `search` and `tail` print the same objects.
    let done = run_cli_ok(
        &data,
        &["audit", "search", "--type", "device.revoked", "--json"],
    )
    .await;
    let found: Vec<EventView> = done
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(found, events(&app, Some("device.revoked")));
    let done = run_cli_ok(&data, &["audit", "search", "--limit", "2", "--json"]).await;
    assert_eq!(done.stdout.lines().count(), 2);
    assert!(
        done.stderr.contains("continue with --after 2"),
        "{}",
        done.stderr
    );
    let bad = run_cli(&data, &["audit", "search", "--limit", "0"]).await;
    assert!(!bad.status.success());
    // The same grammar as GET /v1/audit: an event type or a family, a device id.
    for (flag, value, named) in [
        ("--type", "Device.Revoked!", "`type`"),
        ("--device", "not-a-device", "`device`"),
    ] {
        let bad = run_cli(&data, &["audit", "search", flag, value]).await;
        assert!(!bad.status.success(), "{flag} {value}");
        assert!(bad.stderr.contains(named), "{flag} {value}: {}", bad.stderr);
    }
    let done = run_cli_ok(&data, &["audit", "tail", "-n", "3", "--json"]).await;
    let tail: Vec<EventView> = done
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(tail, all[all.len() - 3..]);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// SIGKILL during a burst of audited actions (real binary)

/// Keeps creating pairing sessions until the server goes away; pushes the id of each
/// one acknowledged with 201 and its body. Any other answer is pushed to `odd`.
async fn create_sessions(
    api: Arc<Api>,
    worker: usize,
    acked: Arc<Mutex<Vec<String>>>,
    odd: Arc<Mutex<Vec<String>>>,
    count: Arc<AtomicUsize>,
) {
    for i in 0.. {
        let sent = api
            .client
            .post(format!("{}/v1/pairing/sessions", api.url))
            .bearer_auth(&api.admin)
            .json(&json!({ "name": format!("burst {worker}-{i}") }))
            .send()
            .await;
        let Ok(response) = sent else { return };
        let status = response.status();
        let Ok(body) = response.text().await else {
            return;
        };
        if status != 201 {
            odd.lock().unwrap().push(format!("{status}: {body}"));
            return;
        }
        let body: Value = serde_json::from_str(&body).unwrap();
        acked
            .lock()
            .unwrap()
            .push(body["session_id"].as_str().unwrap().to_string());
        count.fetch_add(1, Ordering::SeqCst);
    }
}

/// Revokes `devices` one after another while the sessions are being created; pushes
/// each device whose revocation was answered 200.
async fn revoke_devices(
    api: Arc<Api>,
    devices: Vec<String>,
    acked: Arc<Mutex<Vec<String>>>,
    odd: Arc<Mutex<Vec<String>>>,
) {
    for device in devices {
        let sent = api
            .client
            .delete(format!("{}/v1/devices/{device}", api.url))
            .bearer_auth(&api.admin)
            .send()
            .await;
        let Ok(response) = sent else { return };
        let status = response.status();
        let Ok(body) = response.text().await else {
            return;
        };
        if status != 200 {
            odd.lock().unwrap().push(format!("{status}: {body}"));
            return;
        }
        acked.lock().unwrap().push(device);
    }
}

/// Every event of `kind` through `GET /v1/audit`, paging.
async fn api_events(api: &Api, kind: &str) -> Vec<EventView> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let body: Value = api
            .client
            .get(format!(
                "{}/v1/audit?type={kind}&limit=1000&after={after}",
                api.url
            ))
            .bearer_auth(&api.admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let page = page_events(&body);
        if let Some(last) = page.last() {
            after = last.seq;
        }
        out.extend(page);
        match body["next"].as_u64() {
            Some(next) => after = after.max(next),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_action_keeps_its_audit_record_across_sigkill() {
    const WORKERS: usize = 8;
    const KILL_AFTER: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let server = Server::start_ok(serve_cmd(&data));
    let admin = server.bootstrap_token.clone().expect("first start");
    let api = Arc::new(Api::new(&server, &admin));
    let mut victims = Vec::new();
    for i in 0..8 {
        victims.push(api.pair(&format!("victim {i}")).await.device_id);
    }

    let sessions = Arc::new(Mutex::new(Vec::new()));
    let revoked = Arc::new(Mutex::new(Vec::new()));
    let odd = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        tasks.spawn(create_sessions(
            api.clone(),
            worker,
            sessions.clone(),
            odd.clone(),
            count.clone(),
        ));
    }
    // The revocations start once the burst is under way.
    let deadline = Instant::now() + Duration::from_secs(10);
    while count.load(Ordering::SeqCst) < KILL_AFTER / 4 {
        assert!(Instant::now() < deadline, "the burst does not get going");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tasks.spawn(revoke_devices(
        api.clone(),
        victims.clone(),
        revoked.clone(),
        odd.clone(),
    ));
    while count.load(Ordering::SeqCst) < KILL_AFTER || revoked.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the burst does not get going");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // SIGKILL with requests in flight.
    server.kill();
    while tasks.join_next().await.is_some() {}

    let odd = odd.lock().unwrap().clone();
    assert!(
        odd.is_empty(),
        "answers other than success before the kill: {odd:?}"
    );
    let sessions = sessions.lock().unwrap().clone();
    let revoked = revoked.lock().unwrap().clone();
    assert!(sessions.len() >= KILL_AFTER);

    let server = Server::start_ok(serve_cmd(&data));
    assert!(server.bootstrap_token.is_none());
    let api = Api::new(&server, &admin);
    let created: HashSet<String> = api_events(&api, "pairing.created")
        .await
        .into_iter()
        .map(|e| e.details["session_id"].as_str().unwrap().to_string())
        .collect();
    let missing: Vec<&String> = sessions.iter().filter(|s| !created.contains(*s)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged sessions have no pairing.created record: {missing:?}",
        missing.len(),
        sessions.len()
    );
    let revocations = api_events(&api, "device.revoked").await;
    for device in &revoked {
        let found: Vec<&EventView> = revocations
            .iter()
            .filter(|e| e.device.as_deref() == Some(device.as_str()))
            .collect();
        assert_eq!(found.len(), 1, "device.revoked for acknowledged {device}");
        assert_eq!(found[0].details["families_revoked"], 1);
    }
    assert!(
        revocations
            .iter()
            .all(|e| victims.contains(e.device.as_ref().unwrap())),
        "{revocations:?}"
    );

    let done = run_cli_ok(&data, &["audit", "verify"]).await;
    assert!(
        done.stdout.starts_with("audit log verified: "),
        "{}",
        done.stdout
    );
    let stopped = server.stop_ok();
    assert!(
        stopped.stderr.contains("not closed cleanly"),
        "the restart did not see an unclean data file; stderr:\n{}",
        stopped.stderr
    );
    let done = run_cli_ok(&data, &["audit", "verify", "--json"]).await;
    let report: VerifyReport = serde_json::from_str(&done.stdout).unwrap();
    assert!(report.ok, "{report:?}");
    eprintln!(
        "acknowledged before SIGKILL: {} sessions, {} revocations; {} records verified",
        sessions.len(),
        revoked.len(),
        report.records
    );
}
