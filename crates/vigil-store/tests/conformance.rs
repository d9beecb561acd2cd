//! One conformance suite, run against both backends: SQLite (a temporary file)
//! and PostgreSQL (a throwaway cluster, or `DATABASE_URL`).
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::json;
use vigil_store::*;

async fn sqlite() -> Store {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!("vigil-store-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("db{}.sqlite", N.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_file(&path);
    let store = Store::connect(
        &format!("sqlite://{}?mode=rwc", path.display()),
        StoreOptions::default(),
    )
    .await
    .unwrap();
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
    listing_pages_and_filters,
    secrets_stay_apart,
    change_log_and_audit,
    migrations_are_reported,
    bulk_writes_log_every_change,
    changed_since_is_consistent,
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
            vec![Op::Create(entity(
                "policy",
                "p1",
                Some("staff"),
                json!({"a": 1}),
            ))],
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
            vec![Op::Replace {
                entity: entity("policy", "p1", Some("staff2"), json!({"a": 2})),
                if_version: Some(1),
                secret: SecretChange::Keep,
            }],
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
        .write(
            "bob",
            None,
            vec![Op::Delete {
                kind: "policy".into(),
                id: "p1".into(),
                if_version: None,
            }],
        )
        .await
        .unwrap();
    assert_eq!(d.revision, 3);
    assert_eq!(d.records, vec![None]);
    assert_eq!(s.get("policy", "p1").await.unwrap(), None);
    let e = s
        .write(
            "bob",
            None,
            vec![Op::Delete {
                kind: "policy".into(),
                id: "p1".into(),
                if_version: None,
            }],
        )
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
        vec![Op::Create(entity("group", "g1", Some("eng"), json!({})))],
    )
    .await
    .unwrap();
    let e = s
        .write(
            "a",
            None,
            vec![Op::Create(entity("group", "g2", Some("eng"), json!({})))],
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
            vec![Op::Create(entity("group", "g1", Some("other"), json!({})))],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e}");
    // The same key in another kind, and entities without keys, are fine.
    s.write(
        "a",
        None,
        vec![Op::Create(entity("policy", "p", Some("eng"), json!({})))],
    )
    .await
    .unwrap();
    s.write(
        "a",
        None,
        vec![
            Op::Create(entity("device", "d1", None, json!({}))),
            Op::Create(entity("device", "d2", None, json!({}))),
        ],
    )
    .await
    .unwrap();
    // Renaming onto a taken key fails too.
    s.write(
        "a",
        None,
        vec![Op::Create(entity("group", "g3", Some("ops"), json!({})))],
    )
    .await
    .unwrap();
    let e = s
        .write(
            "a",
            None,
            vec![Op::Replace {
                entity: entity("group", "g3", Some("eng"), json!({})),
                if_version: None,
                secret: SecretChange::Keep,
            }],
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
            vec![Op::Create(entity("route", "r", Some("r"), json!({"n": 0})))],
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
                vec![Op::Replace {
                    entity: entity("route", "r", Some("r"), json!({"n": i})),
                    if_version: Some(v),
                    secret: SecretChange::Keep,
                }],
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
        .write(
            "a",
            None,
            vec![Op::Delete {
                kind: "route".into(),
                id: "r".into(),
                if_version: Some(v),
            }],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::VersionMismatch { .. }), "{e}");
}

async fn references_restrict_and_cascade(s: Store) {
    s.write(
        "a",
        None,
        vec![Op::Create(entity("policy", "p", Some("p"), json!({})))],
    )
    .await
    .unwrap();
    let mut route = entity("route", "r", Some("r"), json!({}));
    route.refs = vec![reference("policy", "p", false)];
    s.write("a", None, vec![Op::Create(route)]).await.unwrap();
    let e = s
        .write(
            "a",
            None,
            vec![Op::Delete {
                kind: "policy".into(),
                id: "p".into(),
                if_version: None,
            }],
        )
        .await
        .unwrap_err();
    match e {
        StoreError::Referenced { by, .. } => {
            assert_eq!(by, vec![("route".to_string(), "r".to_string())])
        }
        other => panic!("{other}"),
    }
    // Sessions cascade from their user, and grants from both user and route.
    s.write(
        "a",
        None,
        vec![Op::Create(entity("user", "u", None, json!({})))],
    )
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
    s.write(
        "a",
        None,
        vec![Op::Delete {
            kind: "user".into(),
            id: "u".into(),
            if_version: None,
        }],
    )
    .await
    .unwrap();
    assert_eq!(s.get("session", "s1").await.unwrap(), None);
    assert_eq!(s.get("grant", "g1").await.unwrap(), None);
    let (_, changes) = s.changes_since(before).await.unwrap();
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
    // Replacing drops old references: the policy can go once the route stops using it.
    s.write(
        "a",
        None,
        vec![Op::Replace {
            entity: entity("route", "r", Some("r"), json!({})),
            if_version: None,
            secret: SecretChange::Keep,
        }],
    )
    .await
    .unwrap();
    s.write(
        "a",
        None,
        vec![Op::Delete {
            kind: "policy".into(),
            id: "p".into(),
            if_version: None,
        }],
    )
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
                Op::Create(entity("policy", "ok", Some("ok"), json!({}))),
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
    assert!(s.changes_since(rev).await.unwrap().1.is_empty());
    assert!(s
        .audit(&AuditQuery::default())
        .await
        .unwrap()
        .items
        .is_empty());
}

async fn listing_pages_and_filters(s: Store) {
    let ops = (0..25)
        .map(|i| {
            Op::Create(entity(
                "user",
                &format!("u{i:02}"),
                Some(&format!("k{i}")),
                json!({"status": if i % 5 == 0 { "suspended" } else { "active" }, "n": i}),
            ))
        })
        .collect();
    s.write("a", None, ops).await.unwrap();
    s.write(
        "a",
        None,
        vec![Op::Create(entity(
            "group",
            "g",
            None,
            json!({"status": "suspended"}),
        ))],
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
        vec![Op::Replace {
            entity: entity("admin_token", "t1", Some("ci"), json!({"role": "viewer"})),
            if_version: None,
            secret: SecretChange::Keep,
        }],
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
        vec![Op::Create(entity(
            "policy",
            "p",
            Some("p"),
            json!({"v": 1}),
        ))],
    )
    .await
    .unwrap();
    s.write(
        "bob",
        Some("rename"),
        vec![Op::Replace {
            entity: entity("policy", "p", Some("q"), json!({"v": 2})),
            if_version: None,
            secret: SecretChange::Keep,
        }],
    )
    .await
    .unwrap();
    s.write(
        "carol",
        None,
        vec![Op::Delete {
            kind: "policy".into(),
            id: "p".into(),
            if_version: None,
        }],
    )
    .await
    .unwrap();
    let (current, changes) = s.changes_since(1).await.unwrap();
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
    let dir = std::env::temp_dir().join(format!("vigil-store-fresh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fresh.sqlite");
    let _ = std::fs::remove_file(&path);
    let s = Store::connect(
        &format!("sqlite://{}?mode=rwc", path.display()),
        StoreOptions::default(),
    )
    .await
    .unwrap();
    let status = s.schema_status().await.unwrap();
    assert!(status.applied.is_empty());
    assert_eq!(status.pending(), status.known);
    assert!(Store::connect("mysql://x", StoreOptions::default())
        .await
        .is_err());
}

async fn bulk_writes_log_every_change(s: Store) {
    let ops = (0..600)
        .map(|i| Op::Create(entity("group", &format!("g{i:03}"), None, json!({"n": i}))))
        .collect();
    let c = s.write("bulk", None, ops).await.unwrap();
    assert!(c.records.iter().flatten().all(|r| r.version == c.revision));
    let (_, changes) = s.changes_since(0).await.unwrap();
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
        Op::Create(entity("group", "a", Some("a"), json!({"n": 1}))),
        Op::Create(entity("group", "b", Some("b"), json!({"n": 1}))),
    ])
    .await;
    let base = s.revision().await.unwrap();
    w(vec![Op::Replace {
        entity: entity("group", "a", Some("a"), json!({"n": 2})),
        if_version: None,
        secret: SecretChange::Keep,
    }])
    .await;
    w(vec![Op::Delete {
        kind: "group".into(),
        id: "b".into(),
        if_version: None,
    }])
    .await;
    w(vec![Op::Create(entity(
        "group",
        "c",
        Some("c"),
        json!({"n": 3}),
    ))])
    .await;
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
