//! The router's hardened edges against real clients and upstreams: slow clients,
//! total timeouts, graceful binary upgrade under load, TLS termination with
//! certificate reload.

mod support;

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::*;

#[tokio::test]
async fn clients_trickling_headers_get_408_while_others_are_served() {
    let legacy = Upstream::start("legacy").await;
    let router = Router::start_server(
        "header_timeout_ms = 600",
        &format!("[legacy]\nupstream = \"{}\"\n", legacy.addr),
        &[("flags.json", &flags_doc("unused", false, 0))],
        &[],
    )
    .await;
    let port = router.port.port();
    // Twenty slowloris clients: a header byte every 100 ms, each read far inside
    // pingora's 60 s per-read timeout, so only the total deadline can stop them.
    let slow: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n");
                for b in b"X-Slow: 01234567890123456789012345678901234567890123456789" {
                    if s.write_all(&[*b]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let mut answer = Vec::new();
                let _ = s.read_to_end(&mut answer);
                (
                    String::from_utf8_lossy(&answer).into_owned(),
                    started.elapsed(),
                )
            })
        })
        .collect();
    let client = reqwest::Client::new();
    let mut served = 0;
    let until = Instant::now() + Duration::from_millis(1_500);
    while Instant::now() < until {
        let r = client
            .get(router.url("/page"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        served += 1;
    }
    for t in slow {
        let (answer, took) = t.join().expect("slow client");
        assert!(answer.starts_with("HTTP/1.1 408"), "got {answer:?}");
        assert!(
            took >= Duration::from_millis(550) && took < Duration::from_secs(3),
            "closed after {took:?}"
        );
    }
    let metrics = router.metrics().await;
    assert!(
        metrics.contains("strangler_slow_clients_total 20"),
        "{metrics}"
    );
    eprintln!("slowloris: 20 slow clients got 408, {served} other requests served meanwhile");
}

#[tokio::test]
async fn a_stalled_request_body_times_out_and_others_are_served() {
    let legacy = Upstream::start("legacy").await;
    let router = Router::start_server(
        "body_timeout_ms = 500",
        &format!("[legacy]\nupstream = \"{}\"\n", legacy.addr),
        &[("flags.json", &flags_doc("unused", false, 0))],
        &[],
    )
    .await;
    let port = router.port.port();
    let stalled = std::thread::spawn(move || {
        let started = Instant::now();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial")
            .expect("write");
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        (
            String::from_utf8_lossy(&answer).into_owned(),
            started.elapsed(),
        )
    });
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let r = client
            .get(router.url("/page"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
    }
    let (answer, took) = stalled.join().expect("stalled client");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(took < Duration::from_secs(3), "held for {took:?}");
    // The body is streamed, so legacy saw the headers and a cut-off body: it gets an
    // incomplete request, never a complete one.
    eprintln!("stalled body: 408 after {took:?}");
}

#[tokio::test]
async fn a_total_timeout_sends_slow_reads_to_legacy_and_fails_slow_writes_fast() {
    let legacy = Upstream::start("legacy").await;
    let (new, _) = Upstream::start_with(Arc::new(|_parts| Reply {
        status: 200,
        content_type: "application/json",
        body: "{\"side\":\"new\"}".into(),
        delay: Duration::from_secs(3),
    }))
    .await;
    let mut config = route_config(legacy.addr, new.addr, "");
    config.push_str("total_timeout_ms = 400\n");
    let router = Router::start(
        &config,
        &[("flags.json", &flags_doc("strangler.orders", true, 100))],
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let r = client
        .get(router.url("/api/orders/1"))
        .header("x-user-id", "u1")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["side"], "legacy");
    assert!(started.elapsed() < Duration::from_millis(1_500));

    let started = Instant::now();
    let r = client
        .post(router.url("/api/orders"))
        .header("x-user-id", "u1")
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 504);
    assert!(
        started.elapsed() < Duration::from_millis(1_500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(legacy.hits(), 1, "the POST must not be replayed on legacy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_binary_upgrade_under_load_loses_no_request() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let mut router = Router::start(
        &route_config(legacy.addr, new.addr, ""),
        &[("flags.json", &flags_doc("strangler.orders", true, 50))],
        &[],
    )
    .await;
    let sock = strangler_router::server::upgrade_socket(
        format!("127.0.0.1:{}", router.port.port())
            .parse()
            .expect("addr"),
    );
    let _ = std::fs::remove_file(&sock);
    let stop = Arc::new(AtomicBool::new(false));
    let loaders = load(router.url("/api/orders/1"), 4, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut successor = router.spawn_upgrade();
    let waited = wait_until(Duration::from_secs(10), "upgrade socket", || {
        let sock = sock.clone();
        async move { sock.exists() }
    })
    .await;
    let old_pid = router.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_pid),
        nix::sys::signal::Signal::SIGQUIT,
    )
    .expect("sigquit");
    let exited = tokio::task::block_in_place(|| router.wait_exit(Duration::from_secs(20)));
    // Keep the load on the successor alone for a while.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (sent, ok, errors) = totals(loaders).await;
    let upgrade_log = std::fs::read_to_string(router.path("upgrade.log")).unwrap_or_default();
    eprintln!(
        "graceful upgrade under load: sent {sent}, answered {ok}, failed {} (socket after {waited:?})",
        sent - ok
    );
    assert!(
        exited.is_some(),
        "old router still running; log:\n{}",
        router.log()
    );
    assert!(
        matches!(successor.try_wait(), Ok(None)),
        "successor died; log:\n{upgrade_log}"
    );
    assert_eq!(
        sent,
        ok,
        "errors: {:?}\nold log:\n{}",
        &errors[..errors.len().min(5)],
        router.log()
    );
    assert!(sent > 100, "load too light: {sent}");
    // The successor answers on the same addresses, admin API included.
    let r = reqwest::Client::new()
        .get(router.url("/api/orders/2"))
        .header("x-user-id", "after")
        .send()
        .await
        .expect("after upgrade");
    assert!(r.status().is_success());
    let (status, _) = router.admin(reqwest::Method::GET, "/routes", None).await;
    assert_eq!(status, 200);
    let _ = successor.kill();
    let _ = successor.wait();
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn ca() -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "strangler test CA");
    (params.self_signed(&key).expect("ca"), key)
}

fn leaf(ca: &rcgen::Certificate, ca_key: &rcgen::KeyPair, name: &str) -> Leaf {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.signed_by(&key, ca, ca_key).expect("leaf");
    Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

async fn served_cert(ca_pem: &str, url: &str) -> (Vec<u8>, reqwest::Version, String) {
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("ca"))
        .tls_info(true)
        .build()
        .expect("client");
    let r = client.get(url).send().await.expect("https request");
    let der = r
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate().map(<[u8]>::to_vec))
        .expect("peer certificate");
    let version = r.version();
    let body = r.text().await.expect("body");
    (der, version, body)
}

#[tokio::test]
async fn tls_is_terminated_and_a_renewed_certificate_is_served_without_restart() {
    let legacy = Upstream::start("legacy").await;
    let (ca, ca_key) = ca();
    let ca_pem = ca.pem();
    let first = leaf(&ca, &ca_key, "first");
    let second = leaf(&ca, &ca_key, "second");
    let router = Router::start_server(
        "tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"",
        &format!("[legacy]\nupstream = \"{}\"\n", legacy.addr),
        &[
            ("flags.json", &flags_doc("unused", false, 0)),
            ("cert.pem", &first.cert_pem),
            ("key.pem", &first.key_pem),
        ],
        &[],
    )
    .await;
    let url = format!("https://localhost:{}/page", router.port.port());
    let (der, version, body) = served_cert(&ca_pem, &url).await;
    assert_eq!(der, first.der);
    assert_eq!(version, reqwest::Version::HTTP_2, "ALPN offers h2");
    let echoed: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(echoed["side"], "legacy");
    assert_eq!(echoed["headers"]["x-forwarded-proto"], "https");

    // A broken certificate file is rejected; the old one keeps serving.
    replace_file(&router.path("cert.pem"), "not a certificate\n");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(served_cert(&ca_pem, &url).await.0, first.der);

    // Renewal: key and certificate replaced (in that order, as certbot would).
    replace_file(&router.path("key.pem"), &second.key_pem);
    replace_file(&router.path("cert.pem"), &second.cert_pem);
    let took = wait_until(Duration::from_secs(5), "renewed certificate", || {
        let (ca_pem, url, want) = (ca_pem.clone(), url.clone(), second.der.clone());
        async move { served_cert(&ca_pem, &url).await.0 == want }
    })
    .await;
    eprintln!("renewed certificate served after {took:?}");
    assert!(
        router.log().contains("previous certificate keeps serving"),
        "{}",
        router.log()
    );
}
