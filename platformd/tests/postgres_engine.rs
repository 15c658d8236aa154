//! The PostgreSQL engine against a real PostgreSQL (testing/postgres): what must hold when many
//! instances share one database. Each "instance" here is a store with its own connection pool,
//! as each `serve` process has.

use std::{collections::HashSet, sync::Arc, time::Duration};

use miniapp_platform::{
    TokenRequest,
    store::{PlatformStore, Quota, TokenCheck},
};
use miniapp_platformd::postgres::{NewCode, NewSession, PgError, PgOptions, PgStore, Redeemed, StoredPurpose};
use miniapp_platformd::tenants::Claim;
use sha2::{Digest, Sha256};

const NOW: u64 = 1_767_225_600_000;

async fn instances(n: usize) -> Vec<PgStore> {
    instances_at(&miniapp_test_postgres::shared().database().await, n).await
}

async fn instances_at(url: &str, n: usize) -> Vec<PgStore> {
    let stores: Vec<PgStore> =
        (0..n).map(|_| PgStore::connect(url, &PgOptions { pool_size: 8, ..PgOptions::default() }).unwrap()).collect();
    stores[0].migrate().await.unwrap();
    stores
}

fn hash(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

fn value_code<'a>(code: &str, uid: &'a str, value: &'a str) -> NewCode<'a> {
    NewCode {
        code_hash: hash(code),
        app_id: "app",
        uid,
        openid: "o-u",
        purpose: StoredPurpose::PhoneNumber,
        session_key: None,
        auth_code: None,
        value: Some(value),
        issued_at_ms: NOW,
        expires_at_ms: NOW + 300_000,
    }
}

#[tokio::test]
async fn migrations_run_once_however_many_instances_start_together() {
    let url = miniapp_test_postgres::shared().database().await;
    let stores: Vec<PgStore> = (0..4).map(|_| PgStore::connect(&url, &PgOptions::default()).unwrap()).collect();
    let ran = futures::future::join_all(stores.iter().map(|s| s.migrate())).await;
    let ran: Vec<usize> = ran.into_iter().map(Result::unwrap).collect();
    let steps = 3;
    assert_eq!(ran.iter().sum::<usize>(), steps, "each step ran once, on one instance or another: {ran:?}");
    assert!(ran.iter().all(|&n| n == 0 || n == steps), "one instance ran them all, under the lock: {ran:?}");
    assert_eq!(stores[0].migrate().await.unwrap(), 0);
}

#[tokio::test]
async fn every_instance_agrees_on_one_openid_secret() {
    let url = miniapp_test_postgres::shared().database().await;
    let stores = instances_at(&url, 8).await;
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    // Many rounds of eight instances racing to create it: the losers read the winner's.
    for round in 0..10u8 {
        admin.batch_execute("DELETE FROM meta").await.unwrap();
        let racing = stores.iter().enumerate().map(|(i, s)| s.openid_secret([round * 8 + i as u8; 32]));
        let secrets: HashSet<[u8; 32]> =
            futures::future::join_all(racing).await.into_iter().map(Result::unwrap).collect();
        assert_eq!(secrets.len(), 1, "round {round}: one secret, whichever instance inserted it");
        assert_eq!(stores[3].openid_secret([255; 32]).await.unwrap(), *secrets.iter().next().unwrap());
    }
}

#[tokio::test]
async fn two_hundred_codes_raced_through_two_instances_are_each_redeemed_exactly_once() {
    let stores = instances(2).await;
    let codes: Vec<String> = (0..200).map(|i| format!("code-{i}")).collect();
    for (i, code) in codes.iter().enumerate() {
        let value = format!("+86 {i}");
        stores[i % 2].issue_code(&value_code(code, "u", &value), None, 1_000, &[]).await.unwrap();
    }
    // Every code is tried twice, once through each instance, all at once.
    let attempts = codes.iter().flat_map(|code| {
        stores.iter().map(move |s| async move {
            let outcome =
                s.redeem_code(&hash(code), "app", StoredPurpose::PhoneNumber, None, "backend_http", NOW + 1).await;
            (code.clone(), outcome.unwrap())
        })
    });
    let outcomes = futures::future::join_all(attempts).await;
    let mut taken = HashSet::new();
    for (code, outcome) in &outcomes {
        match outcome {
            Redeemed::Taken(t) => {
                assert!(taken.insert(code.clone()), "{code} redeemed twice");
                let i: usize = code.trim_start_matches("code-").parse().unwrap();
                assert_eq!(t.value.as_deref(), Some(format!("+86 {i}").as_str()));
            }
            Redeemed::Used => {}
            other => panic!("{code}: {other:?}"),
        }
    }
    assert_eq!(taken.len(), 200, "each code redeemed once");
}

#[tokio::test]
async fn a_code_is_refused_for_another_app_purpose_or_user_and_then_still_redeems() {
    let url = miniapp_test_postgres::shared().database().await;
    let stores = instances_at(&url, 1).await;
    let s = &stores[0];
    s.issue_code(&value_code("c", "u", "+86 1"), None, 100, &[7]).await.unwrap();
    let h = hash("c");
    let phone = StoredPurpose::PhoneNumber;
    assert_eq!(s.redeem_code(&h, "other", phone, None, "x", NOW).await.unwrap(), Redeemed::Invalid);
    assert_eq!(s.redeem_code(&h, "app", StoredPurpose::Email, None, "x", NOW).await.unwrap(), Redeemed::Invalid);
    assert_eq!(s.redeem_code(&h, "app", phone, Some("o-other"), "x", NOW).await.unwrap(), Redeemed::Invalid);
    assert_eq!(s.redeem_code(&h, "app", phone, None, "x", NOW + 300_000).await.unwrap(), Redeemed::Expired);
    let Redeemed::Taken(t) = s.redeem_code(&h, "app", phone, Some("o-u"), "x", NOW).await.unwrap() else {
        panic!("the code redeems");
    };
    assert_eq!(t.value.as_deref(), Some("+86 1"));
    assert_eq!(s.redeem_code(&h, "app", phone, None, "x", NOW).await.unwrap(), Redeemed::Used);
    // Another app learns nothing of a code it does not own: spent or not, it never existed.
    assert_eq!(s.redeem_code(&h, "other", phone, None, "x", NOW).await.unwrap(), Redeemed::Invalid);
    // The value left with the redemption.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let row =
        client.query_one("SELECT value, redeemed_via FROM codes WHERE code_id = $1", &[&t.code_id]).await.unwrap();
    assert_eq!((row.get::<_, Option<String>>(0), row.get::<_, Option<String>>(1)), (None, Some("x".to_owned())));
}

#[tokio::test]
async fn a_login_code_and_its_session_are_one_write_and_old_codes_beyond_the_cap_stop_working() {
    let stores = instances(1).await;
    let s = &stores[0];
    let session = |key: &'static str| NewSession {
        app_id: "app",
        uid: "u",
        openid: "o-u",
        session_key: key,
        created_at_ms: NOW,
        expires_at_ms: NOW + 1000,
    };
    for i in 0..3 {
        let code = format!("login-{i}");
        let key = ["k0", "k1", "k2"][i];
        let new = NewCode {
            purpose: StoredPurpose::Login,
            session_key: Some(key),
            value: None,
            ..value_code(&code, "u", "")
        };
        s.issue_code(&new, Some(&session(key)), 2, &[]).await.unwrap();
    }
    assert_eq!(s.session("app", "u").await.unwrap(), Some(("k2".to_owned(), NOW + 1000)));
    assert_eq!(s.session_by_openid("app", "o-u").await.unwrap().unwrap().0, "k2");
    let login = StoredPurpose::Login;
    assert_eq!(s.redeem_code(&hash("login-0"), "app", login, None, "x", NOW).await.unwrap(), Redeemed::Invalid);
    let Redeemed::Taken(t) = s.redeem_code(&hash("login-1"), "app", login, None, "x", NOW).await.unwrap() else {
        panic!("the second newest code still works");
    };
    assert_eq!(t.session_key.as_deref(), Some("k1"));
}

#[tokio::test]
async fn the_rate_limit_holds_across_instances() {
    let stores = instances(3).await;
    // 60 a minute with a burst of 30: one per second refills, so about 30 of 90 quick attempts
    // pass (a second or two of refill at most while the test runs), however the instances share
    // them.
    let quota = Quota { per_minute: 60, burst: 30 };
    let attempts = (0..90).map(|i| PlatformStore::take_attempt(&stores[i % 3], "app", quota, 0));
    let allowed = futures::future::join_all(attempts).await.into_iter().filter(|r| *r.as_ref().unwrap()).count();
    assert!((30..=33).contains(&allowed), "{allowed} of 90 allowed");
    assert!(
        PlatformStore::take_attempt(&stores[1], "other", quota, 0).await.unwrap(),
        "another key has its own bucket"
    );
}

#[tokio::test]
async fn access_tokens_issued_by_one_instance_work_on_another_and_rotation_revokes_them() {
    let stores = instances(2).await;
    let (a, b) = (&stores[0] as &dyn PlatformStore, &stores[1] as &dyn PlatformStore);
    assert!(a.set_app_secret_hash("app", &hash("v1"), false).await.unwrap());
    let fresh = a.issue_token("app", TokenRequest::Fresh, NOW).await.unwrap();
    assert_eq!(b.verify_token(&fresh.token, NOW).await.unwrap(), TokenCheck::Valid("app".into()));
    assert_eq!(b.verify_token(&fresh.token, NOW + 7_200_000).await.unwrap(), TokenCheck::Expired);
    assert_eq!(b.verify_token("never-issued", NOW).await.unwrap(), TokenCheck::Unknown);
    let stable = TokenRequest::Stable { force_refresh: false };
    let (s1, s2) =
        futures::future::join(a.issue_token("app", stable, NOW), b.issue_token("app", stable, NOW + 60_000)).await;
    let (s1, s2) = (s1.unwrap(), s2.unwrap());
    assert_eq!(s1.token, s2.token, "one stable token for every instance");
    assert_eq!(b.verify_token(&s1.token, NOW).await.unwrap(), TokenCheck::Valid("app".into()));
    let forced = b.issue_token("app", TokenRequest::Stable { force_refresh: true }, NOW).await.unwrap();
    assert_ne!(forced.token, s1.token);
    assert!(!b.set_app_secret_hash("app", &hash("v2"), false).await.unwrap(), "exists");
    assert!(b.set_app_secret_hash("app", &hash("v2"), true).await.unwrap(), "rotated");
    assert_eq!(a.app_secret_hash("app").await.unwrap().as_deref(), Some(&hash("v2")[..]));
    for token in [&fresh.token, &s1.token, &forced.token] {
        assert_eq!(
            a.verify_token(token, NOW).await.unwrap(),
            TokenCheck::Unknown,
            "rotation revokes on every instance"
        );
    }
}

#[tokio::test]
async fn tenants_own_their_apps() {
    let stores = instances(1).await;
    let s = &stores[0];
    assert!(s.add_superapp("s", "key", &hash("secret"), None).await.unwrap());
    assert!(!s.add_superapp("s", "key2", &hash("secret"), None).await.unwrap(), "a name is taken once");
    assert!(s.add_superapp("t", "key3", &hash("secret"), None).await.unwrap());
    assert_eq!(s.claim_app("app", "s").await.unwrap(), Claim::Ours);
    assert_eq!(s.claim_app("app", "s").await.unwrap(), Claim::Ours);
    assert_eq!(s.claim_app("app", "t").await.unwrap(), Claim::OtherSuperapp);
    assert_eq!(s.claim_app("other", "nope").await.unwrap(), Claim::NoSuperapp);
    assert_eq!(s.superapp_by_key("key").await.unwrap().map(|(n, _)| n).as_deref(), Some("s"));
}

#[tokio::test]
async fn a_database_that_is_gone_answers_unavailable_within_the_deadline() {
    // A port nothing listens on: connecting fails at once. A listener that never answers: the
    // deadline ends the call.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let _held = Arc::new(silent);
    let options = PgOptions { pool_size: 2, deadline: Duration::from_millis(300) };
    let store = PgStore::connect(&format!("postgres://postgres@127.0.0.1:{port}/x"), &options).unwrap();
    let started = std::time::Instant::now();
    let outcome = store.ping().await;
    assert!(matches!(outcome, Err(PgError::Unavailable(_))), "{outcome:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn every_instance_signs_for_a_superapp_with_one_key_pair() {
    let stores = instances(2).await;
    assert!(stores[0].add_superapp("vouched", "vkey", &hash("secret"), Some("http://127.0.0.1:9")).await.unwrap());
    let (a, b) = tokio::join!(
        miniapp_platformd::vouching::signing_key(&stores[0], "vouched"),
        miniapp_platformd::vouching::signing_key(&stores[1], "vouched"),
    );
    let (a, b) = (a.unwrap().public_key_pem(), b.unwrap().public_key_pem());
    assert_eq!(a, b, "two instances making a key at once keep the first one stored");
    let again = miniapp_platformd::vouching::signing_key(&stores[1], "vouched").await.unwrap();
    assert_eq!(again.public_key_pem(), a);
    assert_eq!(
        stores[0].superapp_server("vouched").await.unwrap(),
        Some((Some("http://127.0.0.1:9".to_owned()), "vkey".to_owned()))
    );
    let missing = miniapp_platformd::vouching::signing_key(&stores[0], "nobody").await;
    assert!(matches!(missing, Err(miniapp_platformd::vouching::KeyError::NoSuperapp(_))), "{missing:?}");
}
