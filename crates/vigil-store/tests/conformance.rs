//! One conformance suite, run against both backends: SQLite (a temporary file)
//! and PostgreSQL (a throwaway cluster, or `DATABASE_URL`).
#![allow(clippy::unwrap_used)]

use serde_json::json;
use vigil_store::*;

/// A store on a new, empty (unmigrated) SQLite file.
async fn fresh_sqlite() -> Store {
    let url = vigil_test_postgres::sqlite_url().unwrap();
    Store::connect(&url, StoreOptions::default()).await.unwrap()
}

async fn sqlite() -> Store {
    let store = fresh_sqlite().await;
    store.migrate().await.unwrap();
    store
}

async fn postgres() -> Store {
    let url = tokio::task::spawn_blocking(vigil_test_postgres::database_url)
        .await
        .unwrap()
        .unwrap();
    let store = Store::connect(&url, StoreOptions::default()).await.unwrap();
    store.migrate().await.unwrap();
    store
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::sqlite().await).await })*
        }
        mod on_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::postgres().await).await })*
        }
    };
}

conformance!(
    crud_and_revisions,
    natural_keys_are_unique,
    versions_guard_against_lost_updates,
    references_restrict_and_cascade,
    failed_writes_leave_nothing,
    concurrent_writes_commit_alone,
    listing_pages_and_filters,
    secrets_stay_apart,
    change_log_and_audit,
    migrations_are_reported,
    bulk_writes_log_every_change,
    changed_since_is_consistent,
    revisions_are_announced,
    cascade_deletes_are_audited,
    the_first_missing_reference_is_named,
    empty_writes_still_take_a_revision,
    very_large_writes_stamp_every_row,
    the_fleet_is_recorded_newest_first,
    nul_is_never_stored_and_never_found,
);

fn entity(kind: &str, id: &str, key: Option<&str>, body: serde_json::Value) -> Entity {
    Entity {
        kind: kind.into(),
        id: id.into(),
        key: key.map(Into::into),
        body,
        secret: None,
        refs: vec![],
    }
}

fn create(kind: &str, id: &str, key: Option<&str>, body: serde_json::Value) -> Op {
    Op::Create(entity(kind, id, key, body))
}

/// A replace that keeps the secret.
fn replace(entity: Entity, if_version: Option<i64>) -> Op {
    Op::Replace {
        entity,
        if_version,
        secret: SecretChange::Keep,
    }
}

fn delete(kind: &str, id: &str, if_version: Option<i64>) -> Op {
    Op::Delete {
        kind: kind.into(),
        id: id.into(),
        if_version,
    }
}

fn reference(kind: &str, id: &str, cascade: bool) -> Ref {
    Ref {
        kind: kind.into(),
        id: id.into(),
        cascade,
    }
}

async fn crud_and_revisions(s: Store) {
    assert_eq!(s.revision().await.unwrap(), 0);
    let c = s
        .write(
            "alice",
            None,
            vec![create("policy", "p1", Some("staff"), json!({"a": 1}))],
        )
        .await
        .unwrap();
    assert_eq!(c.revision, 1);
    let r = c.records[0].clone().unwrap();
    assert_eq!((r.version, r.key.as_deref()), (1, Some("staff")));
    assert_eq!(s.get("policy", "p1").await.unwrap(), Some(r.clone()));
    assert_eq!(
        s.get_by_key("policy", "staff").await.unwrap(),
        Some(r.clone())
    );
    assert_eq!(s.get("policy", "nope").await.unwrap(), None);
    assert_eq!(
        s.get("route", "p1").await.unwrap(),
        None,
        "ids are per kind"
    );

    let replaced = s
        .write(
            "bob",
            None,
            vec![replace(
                entity("policy", "p1", Some("staff2"), json!({"a": 2})),
                Some(1),
            )],
        )
        .await
        .unwrap();
    let r2 = replaced.records[0].clone().unwrap();
    assert_eq!(
        (r2.version, r2.body.clone(), r2.created_at),
        (2, json!({"a": 2}), r.created_at)
    );
    assert_eq!(
        s.get_by_key("policy", "staff").await.unwrap(),
        None,
        "the old key is free again"
    );

    let d = s
        .write("bob", None, vec![delete("policy", "p1", None)])
        .await
        .unwrap();
    assert_eq!(d.revision, 3);
    assert_eq!(d.records, vec![None]);
    assert_eq!(s.get("policy", "p1").await.unwrap(), None);
    let e = s
        .write("bob", None, vec![delete("policy", "p1", None)])
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
    assert_eq!(
        s.revision().await.unwrap(),
        3,
        "a failed write bumps nothing"
    );
}

async fn natural_keys_are_unique(s: Store) {
    s.write(
        "a",
        None,
        vec![create("group", "g1", Some("eng"), json!({}))],
    )
    .await
    .unwrap();
    let e = s
        .write(
            "a",
            None,
            vec![create("group", "g2", Some("eng"), json!({}))],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::AlreadyExists { key, .. } if key == "eng"),
        "{e}"
    );
    let e = s
        .write(
            "a",
            None,
            vec![create("group", "g1", Some("other"), json!({}))],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e}");
    // The same key in another kind, and entities without keys, are fine.
    s.write(
        "a",
        None,
        vec![create("policy", "p", Some("eng"), json!({}))],
    )
    .await
    .unwrap();
    s.write(
        "a",
        None,
        vec![
            create("device", "d1", None, json!({})),
            create("device", "d2", None, json!({})),
        ],
    )
    .await
    .unwrap();
    // Renaming onto a taken key fails too.
    s.write(
        "a",
        None,
        vec![create("group", "g3", Some("ops"), json!({}))],
    )
    .await
    .unwrap();
    let e = s
        .write(
            "a",
            None,
            vec![replace(entity("group", "g3", Some("eng"), json!({})), None)],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e}");
}

async fn versions_guard_against_lost_updates(s: Store) {
    let v = s
        .write(
            "a",
            None,
            vec![create("route", "r", Some("r"), json!({"n": 0}))],
        )
        .await
        .unwrap()
        .revision;
    // Sixteen writers race with the same ETag: exactly one wins.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.write(
                &format!("w{i}"),
                None,
                vec![replace(
                    entity("route", "r", Some("r"), json!({"n": i})),
                    Some(v),
                )],
            )
            .await
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(StoreError::VersionMismatch { current, .. }) => assert!(current > v),
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(
        s.revision().await.unwrap(),
        v + 1,
        "losers roll back their revision bump"
    );
    let e = s
        .write("a", None, vec![delete("route", "r", Some(v))])
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::VersionMismatch { .. }), "{e}");
}

async fn references_restrict_and_cascade(s: Store) {
    s.write("a", None, vec![create("policy", "p", Some("p"), json!({}))])
        .await
        .unwrap();
    let mut route = entity("route", "r", Some("r"), json!({}));
    route.refs = vec![reference("policy", "p", false)];
    s.write("a", None, vec![Op::Create(route)]).await.unwrap();
    let e = s
        .write("a", None, vec![delete("policy", "p", None)])
        .await
        .unwrap_err();
    match e {
        StoreError::Referenced { by, .. } => {
            assert_eq!(by, vec![("route".to_string(), "r".to_string())])
        }
        other => panic!("{other}"),
    }
    // Sessions cascade from their user, and grants from both user and route.
    s.write("a", None, vec![create("user", "u", None, json!({}))])
        .await
        .unwrap();
    let mut sess = entity("session", "s1", None, json!({}));
    sess.refs = vec![reference("user", "u", true)];
    let mut grant = entity("grant", "g1", None, json!({}));
    grant.refs = vec![reference("user", "u", true), reference("route", "r", true)];
    s.write("a", None, vec![Op::Create(sess), Op::Create(grant)])
        .await
        .unwrap();
    let before = s.revision().await.unwrap();
    s.write("a", None, vec![delete("user", "u", None)])
        .await
        .unwrap();
    assert_eq!(s.get("session", "s1").await.unwrap(), None);
    assert_eq!(s.get("grant", "g1").await.unwrap(), None);
    let (_, changes, _) = s.changed_since(before).await.unwrap();
    let deleted: Vec<(&str, &str)> = changes
        .iter()
        .map(|c| (c.kind.as_str(), c.id.as_str()))
        .collect();
    assert_eq!(
        deleted,
        vec![("grant", "g1"), ("session", "s1"), ("user", "u")]
    );
    assert!(changes
        .iter()
        .all(|c| c.op == "delete" && c.revision == before + 1));
    // A replace with the same references (listed twice, in another order) keeps them.
    s.write("a", None, vec![create("policy", "q", Some("q"), json!({}))])
        .await
        .unwrap();
    let mut same = entity("route", "r", Some("r"), json!({"v": 2}));
    same.refs = vec![
        reference("policy", "q", false),
        reference("policy", "p", false),
        reference("policy", "q", true),
    ];
    s.write("a", None, vec![replace(same, None)]).await.unwrap();
    let mut same = entity("route", "r", Some("r"), json!({"v": 3}));
    same.refs = vec![
        reference("policy", "p", false),
        reference("policy", "q", false),
    ];
    s.write("a", None, vec![replace(same, None)]).await.unwrap();
    for p in ["p", "q"] {
        let e = s
            .write("a", None, vec![delete("policy", p, None)])
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Referenced { .. }), "{p}: {e}");
    }
    // The same target with another cascade flag is a change.
    let mut cascading = entity("route", "r", Some("r"), json!({"v": 4}));
    cascading.refs = vec![
        reference("policy", "p", false),
        reference("policy", "q", true),
    ];
    s.write("a", None, vec![replace(cascading, None)])
        .await
        .unwrap();
    s.write("a", None, vec![delete("policy", "q", None)])
        .await
        .unwrap();
    assert_eq!(s.get("route", "r").await.unwrap(), None, "cascaded");
    let mut route = entity("route", "r", Some("r"), json!({}));
    route.refs = vec![reference("policy", "p", false)];
    s.write("a", None, vec![Op::Create(route)]).await.unwrap();
    // Replacing drops old references: the policy can go once the route stops using it.
    s.write(
        "a",
        None,
        vec![replace(entity("route", "r", Some("r"), json!({})), None)],
    )
    .await
    .unwrap();
    s.write("a", None, vec![delete("policy", "p", None)])
        .await
        .unwrap();
}

async fn failed_writes_leave_nothing(s: Store) {
    let rev = s.revision().await.unwrap();
    // The second op refers to a missing entity: the first must not survive either.
    let mut bad = entity("route", "r2", Some("r2"), json!({}));
    bad.refs = vec![reference("policy", "missing", false)];
    let e = s
        .write(
            "a",
            None,
            vec![
                create("policy", "ok", Some("ok"), json!({})),
                Op::Create(bad),
            ],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::MissingReference { id, .. } if id == "missing"),
        "{e}"
    );
    assert_eq!(s.get("policy", "ok").await.unwrap(), None);
    assert_eq!(s.revision().await.unwrap(), rev);
    assert!(s.changed_since(rev).await.unwrap().1.is_empty());
    assert!(s
        .audit(&AuditQuery::default())
        .await
        .unwrap()
        .items
        .is_empty());
}

/// Many writes at once (committed in groups): each succeeds or fails on its own,
/// every success has its own revision, with no gaps, and only successes leave a trace.
async fn concurrent_writes_commit_alone(s: Store) {
    let rev = s.revision().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..48 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let ops = match i % 4 {
                // Twelve writers race for one name: exactly one wins.
                0 => vec![create("group", &format!("g{i}"), Some("same"), json!({}))],
                // The second op fails: the first must go too.
                1 => {
                    let mut bad = entity("route", &format!("r{i}"), None, json!({}));
                    bad.refs = vec![reference("policy", "missing", false)];
                    vec![
                        create("policy", &format!("undone{i}"), None, json!({})),
                        Op::Create(bad),
                    ]
                }
                _ => vec![create("policy", &format!("p{i}"), None, json!({"i": i}))],
            };
            (i, s.write("w", None, ops).await)
        }));
    }
    let mut revisions = Vec::new();
    let mut same = 0;
    for t in tasks {
        let (i, result) = t.await.unwrap();
        match (i % 4, result) {
            (0, Ok(c)) => {
                same += 1;
                revisions.push(c.revision);
            }
            (0, Err(e)) => assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e}"),
            (1, Err(e)) => assert!(matches!(e, StoreError::MissingReference { .. }), "{e}"),
            (_, Ok(c)) => {
                let rec = s.get("policy", &format!("p{i}")).await.unwrap().unwrap();
                assert_eq!(rec.version, c.revision);
                assert_eq!(c.records[0].as_ref().unwrap().version, c.revision);
                revisions.push(c.revision);
            }
            (k, r) => panic!(
                "writer {i} (kind {k}): unexpected {:?}",
                r.map(|c| c.revision)
            ),
        }
    }
    assert_eq!(same, 1, "exactly one writer gets the name");
    revisions.sort();
    let expected: Vec<i64> = (rev + 1..=rev + 25).collect();
    assert_eq!(revisions, expected, "one revision per success, no gaps");
    assert_eq!(s.revision().await.unwrap(), rev + 25);
    let (current, changes, _) = s.changed_since(rev).await.unwrap();
    assert_eq!(current, rev + 25);
    let logged: Vec<i64> = changes.iter().map(|c| c.revision).collect();
    assert_eq!(logged, expected, "one change-log row per success");
    for i in (1..48).step_by(4) {
        assert_eq!(s.get("policy", &format!("undone{i}")).await.unwrap(), None);
    }
    let audit = s.audit(&AuditQuery::default()).await.unwrap().items;
    assert_eq!(audit.len(), 25);
}

async fn listing_pages_and_filters(s: Store) {
    let ops = (0..25)
        .map(|i| {
            create(
                "user",
                &format!("u{i:02}"),
                Some(&format!("k{i}")),
                json!({"status": if i % 5 == 0 { "suspended" } else { "active" }, "n": i}),
            )
        })
        .collect();
    s.write("a", None, ops).await.unwrap();
    s.write(
        "a",
        None,
        vec![create("group", "g", None, json!({"status": "suspended"}))],
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut q = ListQuery {
        limit: Some(10),
        ..ListQuery::default()
    };
    loop {
        let page = s.list("user", &q).await.unwrap();
        seen.extend(page.items.iter().map(|r| r.id.clone()));
        match page.next {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(
        seen,
        (0..25).map(|i| format!("u{i:02}")).collect::<Vec<_>>()
    );
    let suspended = s
        .list(
            "user",
            &ListQuery {
                fields: vec![("status", "suspended".into())],
                ..ListQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        suspended
            .items
            .iter()
            .map(|r| r.id.as_str())
            .collect::<Vec<_>>(),
        vec!["u00", "u05", "u10", "u15", "u20"]
    );
    let by_key = s
        .list(
            "user",
            &ListQuery {
                key: Some("k7".into()),
                ..ListQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(by_key.items.len(), 1);
    assert!(s
        .list(
            "user",
            &ListQuery {
                cursor: Some("!!".into()),
                ..ListQuery::default()
            }
        )
        .await
        .is_err());
    assert!(s
        .list(
            "user",
            &ListQuery {
                fields: vec![("bad'field", "x".into())],
                ..ListQuery::default()
            }
        )
        .await
        .is_err());
    let (rev, all) = s.load_all().await.unwrap();
    assert_eq!((rev, all.len()), (2, 26));
    assert!(all
        .iter()
        .any(|r| r.kind == "group" && r.body.contains("suspended")));
}

async fn secrets_stay_apart(s: Store) {
    let mut tok = entity("admin_token", "t1", Some("ci"), json!({"role": "editor"}));
    tok.secret = Some("hash-1".into());
    s.write("a", None, vec![Op::Create(tok)]).await.unwrap();
    let found = s
        .find_by_secret("admin_token", "hash-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, "t1");
    assert!(!found.body.to_string().contains("hash-1"));
    assert_eq!(
        s.find_by_secret("admin_token", "hash-2").await.unwrap(),
        None
    );
    assert_eq!(
        s.secret("admin_token", "t1").await.unwrap().as_deref(),
        Some("hash-1")
    );
    // Keep leaves the secret; Set replaces it.
    s.write(
        "a",
        None,
        vec![replace(
            entity("admin_token", "t1", Some("ci"), json!({"role": "viewer"})),
            None,
        )],
    )
    .await
    .unwrap();
    assert_eq!(
        s.secret("admin_token", "t1").await.unwrap().as_deref(),
        Some("hash-1")
    );
    s.write(
        "a",
        None,
        vec![Op::Replace {
            entity: entity("admin_token", "t1", Some("ci"), json!({})),
            if_version: None,
            secret: SecretChange::Set(Some("hash-3".into())),
        }],
    )
    .await
    .unwrap();
    assert!(s
        .find_by_secret("admin_token", "hash-1")
        .await
        .unwrap()
        .is_none());
    assert!(s
        .find_by_secret("admin_token", "hash-3")
        .await
        .unwrap()
        .is_some());
    let audit = s.audit(&AuditQuery::default()).await.unwrap();
    assert!(
        audit
            .items
            .iter()
            .all(|e| !serde_json::to_string(e).unwrap().contains("hash-")),
        "secrets never reach the audit trail"
    );
}

async fn change_log_and_audit(s: Store) {
    s.write(
        "alice",
        None,
        vec![create("policy", "p", Some("p"), json!({"v": 1}))],
    )
    .await
    .unwrap();
    s.write(
        "bob",
        Some("rename"),
        vec![replace(
            entity("policy", "p", Some("q"), json!({"v": 2})),
            None,
        )],
    )
    .await
    .unwrap();
    s.write("carol", None, vec![delete("policy", "p", None)])
        .await
        .unwrap();
    let (current, changes, _) = s.changed_since(1).await.unwrap();
    assert_eq!(current, 3);
    assert_eq!(
        changes
            .iter()
            .map(|c| (c.revision, c.op.as_str()))
            .collect::<Vec<_>>(),
        vec![(2, "upsert"), (3, "delete")]
    );
    let audit = s.audit(&AuditQuery::default()).await.unwrap().items;
    assert_eq!(
        audit
            .iter()
            .map(|e| (e.actor.as_str(), e.action.as_str(), e.revision))
            .collect::<Vec<_>>(),
        vec![
            ("alice", "create", 1),
            ("bob", "rename", 2),
            ("carol", "delete", 3)
        ]
    );
    assert_eq!(audit[1].before, Some(json!({"v": 1})));
    assert_eq!(audit[1].after, Some(json!({"v": 2})));
    assert_eq!(audit[2].after, None);
    let bobs = s
        .audit(&AuditQuery {
            actor: Some("bob".into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(bobs.items.len(), 1);
    let page = s
        .audit(&AuditQuery {
            limit: Some(2),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let rest = s
        .audit(&AuditQuery {
            cursor: page.next,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        rest.items
            .iter()
            .map(|e| e.actor.as_str())
            .collect::<Vec<_>>(),
        vec!["carol"]
    );
}

async fn migrations_are_reported(s: Store) {
    let status = s.schema_status().await.unwrap();
    assert!(status.pending().is_empty());
    assert_eq!(status.applied, status.known);
    s.migrate().await.unwrap();
    s.ping().await.unwrap();
}

#[tokio::test]
async fn a_fresh_database_reports_pending_migrations() {
    let s = fresh_sqlite().await;
    let status = s.schema_status().await.unwrap();
    assert!(status.applied.is_empty());
    assert_eq!(status.pending(), status.known);
    assert!(Store::connect("mysql://x", StoreOptions::default())
        .await
        .is_err());
}

async fn bulk_writes_log_every_change(s: Store) {
    let ops = (0..600)
        .map(|i| create("group", &format!("g{i:03}"), None, json!({"n": i})))
        .collect();
    let c = s.write("bulk", None, ops).await.unwrap();
    assert!(c.records.iter().flatten().all(|r| r.version == c.revision));
    let (_, changes, _) = s.changed_since(0).await.unwrap();
    assert_eq!(changes.len(), 600);
    assert!(changes.iter().all(|ch| ch.revision == c.revision));
    let mut audit = 0;
    let mut q = AuditQuery {
        limit: Some(1000),
        ..AuditQuery::default()
    };
    loop {
        let page = s.audit(&q).await.unwrap();
        audit += page.items.len();
        match page.next {
            Some(n) => q.cursor = Some(n),
            None => break,
        }
    }
    assert_eq!(audit, 600);
    let (rev, rows) = s.load_all().await.unwrap();
    assert_eq!(rev, c.revision);
    assert!(rows
        .iter()
        .all(|r| r.version == c.revision
            && serde_json::from_str::<serde_json::Value>(&r.body).is_ok()));
    assert_eq!(
        s.get("group", "g599").await.unwrap().unwrap().version,
        c.revision
    );
}

/// `changed_since` names every change after a revision and returns the current form
/// of the entities that still exist, all as of one revision.
async fn changed_since_is_consistent(s: Store) {
    let w = |ops: Vec<Op>| {
        let s = s.clone();
        async move { s.write("t", None, ops).await.unwrap() }
    };
    w(vec![
        create("group", "a", Some("a"), json!({"n": 1})),
        create("group", "b", Some("b"), json!({"n": 1})),
    ])
    .await;
    let base = s.revision().await.unwrap();
    w(vec![replace(
        entity("group", "a", Some("a"), json!({"n": 2})),
        None,
    )])
    .await;
    w(vec![delete("group", "b", None)]).await;
    w(vec![create("group", "c", Some("c"), json!({"n": 3}))]).await;
    let (current, changes, records) = s.changed_since(base).await.unwrap();
    assert_eq!(current, base + 3);
    assert_eq!(
        changes
            .iter()
            .map(|c| (c.revision - base, c.id.as_str(), c.op.as_str()))
            .collect::<Vec<_>>(),
        vec![(1, "a", "upsert"), (2, "b", "delete"), (3, "c", "upsert")]
    );
    let got: Vec<(&str, serde_json::Value)> = records
        .iter()
        .map(|r| (r.id.as_str(), serde_json::from_str(&r.body).unwrap()))
        .collect();
    assert_eq!(got, vec![("a", json!({"n": 2})), ("c", json!({"n": 3}))]);
    let (again, none, nothing) = s.changed_since(current).await.unwrap();
    assert_eq!(again, current);
    assert!(none.is_empty() && nothing.is_empty());
}

/// On PostgreSQL every committed write is announced to listeners; SQLite has none.
async fn revisions_are_announced(s: Store) {
    let Some(mut listener) = s.listen_revisions().await.unwrap() else {
        assert_eq!(s.dialect(), Dialect::Sqlite);
        return;
    };
    let c = s
        .write("a", None, vec![create("group", "g", None, json!({}))])
        .await
        .unwrap();
    let announced = tokio::time::timeout(std::time::Duration::from_secs(10), listener.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(announced, c.revision);
}

async fn cascade_deletes_are_audited(s: Store) {
    s.write("a", None, vec![create("user", "u", None, json!({"u": 1}))])
        .await
        .unwrap();
    let mut sess = entity("session", "s", None, json!({"s": 1}));
    sess.refs = vec![reference("user", "u", true)];
    s.write("a", None, vec![Op::Create(sess)]).await.unwrap();
    let c = s
        .write("b", Some("purge"), vec![delete("user", "u", None)])
        .await
        .unwrap();
    let audit = s
        .audit(&AuditQuery {
            actor: Some("b".into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap()
        .items;
    assert_eq!(
        audit
            .iter()
            .map(|e| (
                e.action.as_str(),
                e.entity_id.as_str(),
                e.revision,
                e.before.clone(),
                e.after.clone()
            ))
            .collect::<Vec<_>>(),
        vec![
            (
                "cascade-delete",
                "s",
                c.revision,
                Some(json!({"s": 1})),
                None
            ),
            ("purge", "u", c.revision, Some(json!({"u": 1})), None),
        ]
    );
}

async fn the_first_missing_reference_is_named(s: Store) {
    s.write("a", None, vec![create("policy", "b", None, json!({}))])
        .await
        .unwrap();
    let rev = s.revision().await.unwrap();
    let mut route = entity("route", "r", None, json!({}));
    route.refs = vec![
        reference("policy", "d", false),
        reference("policy", "b", false),
        reference("policy", "c", false),
        reference("policy", "b", true),
    ];
    let e = s
        .write("a", None, vec![Op::Create(route)])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::MissingReference { kind, id } if kind == "policy" && id == "c"),
        "{e}"
    );
    assert_eq!(s.revision().await.unwrap(), rev);
    // With every target there, duplicates collapse into one reference.
    let mut route = entity("route", "r", None, json!({}));
    route.refs = vec![
        reference("policy", "b", false),
        reference("policy", "b", false),
    ];
    s.write("a", None, vec![Op::Create(route)]).await.unwrap();
    let e = s
        .write("a", None, vec![delete("policy", "b", None)])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Referenced { by, .. } if by.len() == 1),
        "{e}"
    );
}

async fn empty_writes_still_take_a_revision(s: Store) {
    let rev = s.revision().await.unwrap();
    let c = s.write("a", None, vec![]).await.unwrap();
    assert_eq!((c.revision, c.records.len()), (rev + 1, 0));
    assert!(s.changed_since(rev).await.unwrap().1.is_empty());
}

/// More rows than one statement stamps or logs.
async fn very_large_writes_stamp_every_row(s: Store) {
    let ops = (0..1100)
        .map(|i| create("device", &format!("d{i:04}"), None, json!({})))
        .collect();
    let c = s.write("bulk", None, ops).await.unwrap();
    let (rev, rows) = s.load_all().await.unwrap();
    assert_eq!((rev, rows.len()), (c.revision, 1100));
    assert!(rows.iter().all(|r| r.version == c.revision));
    assert_eq!(s.changed_since(0).await.unwrap().1.len(), 1100);
}

async fn the_fleet_is_recorded_newest_first(s: Store) {
    let revision = s.revision().await.unwrap();
    let row = |id: &str, status: &str, at: i64| (id.to_owned(), status.to_owned(), at);
    s.put_proxies(&[row("b", "{\"v\":1}", 100), row("a", "{\"v\":1}", 100)], 0)
        .await
        .unwrap();
    // An older observation (from a replica that lost the proxy) does not win; nor
    // does an older one in the same batch.
    s.put_proxies(
        &[
            row("a", "{\"v\":0}", 50),
            row("b", "{\"v\":2}", 200),
            row("b", "{\"v\":9}", 90),
        ],
        0,
    )
    .await
    .unwrap();
    assert_eq!(
        s.proxies().await.unwrap(),
        vec![
            ("a".to_owned(), "{\"v\":1}".to_owned()),
            ("b".to_owned(), "{\"v\":2}".to_owned())
        ]
    );
    // Proxies not seen for long are forgotten.
    s.put_proxies(&[], 150).await.unwrap();
    assert_eq!(s.proxies().await.unwrap().len(), 1);
    // Observations are not configuration: no revision is taken.
    assert_eq!(s.revision().await.unwrap(), revision);
}

/// PostgreSQL's `text` cannot hold NUL (U+0000) and its JSON functions cannot read
/// `\u0000`: a write holding one is refused on both stores before the database
/// sees it, and a lookup by one finds nothing, so neither is a database error,
/// and no stored document can break the filtered lists of its kind.
async fn nul_is_never_stored_and_never_found(s: Store) {
    use base64::Engine as _;
    s.write(
        "a",
        None,
        vec![create("user", "u1", Some("k1"), json!({"email": "a@x"}))],
    )
    .await
    .unwrap();
    let with_ref = |r: Ref| Entity {
        refs: vec![r],
        ..entity("user", "u2", None, json!({}))
    };
    let refused = [
        create("user", "u\0", None, json!({})),
        create("user", "u2", Some("k\0"), json!({})),
        create("user", "u2", None, json!({"attributes": {"a": "x\u{0}y"}})),
        create("user", "u2", None, json!({"attributes": {"a\0": 1}})),
        create("user", "u2", None, json!({"groups": ["x", "\0"]})),
        Op::Create(Entity {
            secret: Some("s\0".into()),
            ..entity("user", "u2", None, json!({}))
        }),
        Op::Create(with_ref(reference("group", "g\0", false))),
        replace(
            entity("user", "u1", Some("k1"), json!({"email": "\0"})),
            None,
        ),
    ];
    for op in refused {
        let err = s.write("a", None, vec![op.clone()]).await.unwrap_err();
        assert!(matches!(err, StoreError::Nul(_)), "{op:?}: {err:?}");
    }
    let err = s.write("a\0", None, vec![]).await.unwrap_err();
    assert!(matches!(err, StoreError::Nul(_)), "{err:?}");
    let err = s
        .write("a", None, vec![delete("user", "u\0", None)])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    assert_eq!(
        s.revision().await.unwrap(),
        1,
        "nothing refused was written"
    );

    assert_eq!(s.get("user", "u1\0").await.unwrap(), None);
    assert_eq!(s.get_by_key("user", "\0").await.unwrap(), None);
    assert_eq!(s.find_by_secret("user", "\0").await.unwrap(), None);
    assert_eq!(s.secret("user", "\0").await.unwrap(), None);
    let q = ListQuery {
        fields: vec![("email", "a@x\0".into())],
        ..ListQuery::default()
    };
    assert!(s.list("user", &q).await.unwrap().items.is_empty());
    let q = ListQuery {
        fields: vec![("email", "a@x".into())],
        ..ListQuery::default()
    };
    assert_eq!(s.list("user", &q).await.unwrap().items.len(), 1);
    let q = ListQuery {
        key: Some("k\0".into()),
        ..ListQuery::default()
    };
    assert!(s.list("user", &q).await.unwrap().items.is_empty());
    let cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("u\0");
    let q = ListQuery {
        cursor: Some(cursor.clone()),
        ..ListQuery::default()
    };
    assert!(matches!(
        s.list("user", &q).await,
        Err(StoreError::InvalidCursor)
    ));
    let q = AuditQuery {
        actor: Some("a\0".into()),
        ..AuditQuery::default()
    };
    assert!(s.audit(&q).await.unwrap().items.is_empty());
    let q = AuditQuery {
        cursor: Some(cursor),
        ..AuditQuery::default()
    };
    assert!(matches!(s.audit(&q).await, Err(StoreError::InvalidCursor)));
}
