//! TLS and mTLS, black-box: test certificates are generated here with rcgen
//! (a CA, a server certificate for localhost/127.0.0.1, client certificates),
//! the real server is started with `Config.tls`, and both the Rust client and
//! the CLI binary connect to it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use crate::helpers::*;
use billing_mode::{
    auth::Role,
    config::{Config, TlsFiles},
    proto::{
        billing_mode_client::BillingModeClient, BuildEnvRequest, CredentialKeys, HistoryRequest,
        Mode, Origin, ResolveRequest, SetRequest,
    },
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tonic::{
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
    Request, Status,
};

/// PEM files in a temporary directory.
struct Pki {
    _dir: tempfile::TempDir,
    ca_pem: String,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    client_identity: (String, String),
    /// A client certificate signed by a CA the server does not trust.
    rogue_identity: (String, String),
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (p.self_signed(&key).unwrap(), key)
}

fn leaf(
    sans: &[&str],
    cn: &str,
    usage: ExtendedKeyUsagePurpose,
    issuer: &rcgen::Certificate,
    issuer_key: &KeyPair,
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = p.signed_by(&key, issuer, issuer_key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let (ca_cert, ca_key) = ca("billing-mode test CA");
    let (rogue_ca, rogue_key) = ca("rogue CA");
    let server = leaf(
        &["localhost", "127.0.0.1"],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
        &ca_cert,
        &ca_key,
    );
    let client = leaf(
        &["provisioner.test"],
        "provisioner",
        ExtendedKeyUsagePurpose::ClientAuth,
        &ca_cert,
        &ca_key,
    );
    let rogue = leaf(
        &["rogue.test"],
        "rogue",
        ExtendedKeyUsagePurpose::ClientAuth,
        &rogue_ca,
        &rogue_key,
    );
    let write = |name: &str, text: &str| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ca_pem = ca_cert.pem();
    Pki {
        ca: write("ca.pem", &ca_pem),
        server_cert: write("server.pem", &server.0),
        server_key: write("server.key", &server.1),
        client_cert: write("client.pem", &client.0),
        client_key: write("client.key", &client.1),
        ca_pem,
        client_identity: client,
        rogue_identity: rogue,
        _dir: dir,
    }
}

fn tls_config(db: &TestDb, pki: &Pki, mtls: bool) -> Config {
    Config {
        tls: Some(TlsFiles {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: mtls.then(|| pki.ca.clone()),
        }),
        ..config(db)
    }
}

/// Connects over TLS to `addr` as "localhost", trusting `ca_pem` (if any)
/// and presenting `identity` (if any), with `token` (if any); then runs a
/// Resolve flow: Set, Resolve, BuildEnv, History.
async fn tls_flow(
    addr: SocketAddr,
    ca_pem: Option<&str>,
    domain: &str,
    identity: Option<&(String, String)>,
    token: Option<&str>,
) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new().domain_name(domain);
    if let Some(ca) = ca_pem {
        tls = tls.ca_certificate(Certificate::from_pem(ca));
    }
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{}", addr.port()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .tls_config(tls)
        .map_err(|e| format!("tls config: {e}"))?;
    let channel = tokio::time::timeout(Duration::from_secs(10), endpoint.connect())
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e:?}"))?;
    let header: Option<tonic::metadata::MetadataValue<_>> =
        token.map(|t| format!("Bearer {t}").parse().unwrap());
    let mut c = BillingModeClient::with_interceptor(channel, move |mut req: Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok::<_, Status>(req)
    });
    let ws = new_workspace();
    let flow = async {
        c.set(SetRequest {
            workspace_id: ws.clone(),
            runtime: Some("claude-code".into()),
            model: Some("opus".into()),
            credential_keys: Some(CredentialKeys {
                keys: vec!["CLAUDE_CODE_OAUTH_TOKEN".into()],
            }),
            ..Default::default()
        })
        .await?;
        let r = c
            .resolve(ResolveRequest {
                workspace_id: ws.clone(),
            })
            .await?
            .into_inner()
            .resolution
            .unwrap();
        assert_eq!(r.mode, Mode::Byok as i32);
        let b = c
            .build_env(BuildEnvRequest {
                workspace_id: ws.clone(),
                env: vec![env(Origin::Workspace, "CLAUDE_CODE_OAUTH_TOKEN", "mine")],
            })
            .await?
            .into_inner();
        assert_eq!(b.resolution.unwrap().mode, Mode::Byok as i32);
        let h = c
            .history(HistoryRequest {
                workspace_id: ws.clone(),
                page_size: 0,
                page_token: String::new(),
            })
            .await?
            .into_inner();
        assert_eq!(h.entries.len(), 1);
        Ok::<_, Status>(())
    };
    tokio::time::timeout(Duration::from_secs(15), flow)
        .await
        .map_err(|_| "calls timed out".to_owned())?
        .map_err(|s| format!("call: {s:?}"))
}

/// A plaintext (h2c) client against `addr`.
async fn plaintext_flow(addr: SocketAddr) -> Result<(), String> {
    let attempt = async {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        BillingModeClient::new(channel)
            .resolve(ResolveRequest {
                workspace_id: new_workspace(),
            })
            .await
            .map(drop)
            .map_err(|s| format!("call: {s:?}"))
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .map_err(|_| "timed out".to_owned())?
}

backends!(tls_serves_verified_clients_and_refuses_plaintext);
async fn tls_serves_verified_clients_and_refuses_plaintext(db: TestDb) {
    let pki = &pki();
    let app = TestApp::spawn_with(tls_config(&db, pki, false)).await;
    tls_flow(app.addr, Some(&pki.ca_pem), "localhost", None, None)
        .await
        .unwrap_or_else(|e| panic!("{:?}: a TLS client must succeed: {e}", db.backend));
    // The IP SAN verifies too.
    tls_flow(app.addr, Some(&pki.ca_pem), "127.0.0.1", None, None)
        .await
        .unwrap_or_else(|e| panic!("verifying the IP SAN: {e}"));

    let e = plaintext_flow(app.addr)
        .await
        .expect_err("a plaintext client must fail against a TLS server");
    // Not an answer of the service (the workspace is unknown: a server that
    // took plaintext would say NotFound): the connection itself failed.
    assert!(!e.contains("NotFound"), "a plaintext call was served: {e}");
    eprintln!("plaintext client: {e}");
    let e = tls_flow(app.addr, None, "localhost", None, None)
        .await
        .expect_err("a client that does not trust the CA must fail");
    eprintln!("untrusted CA: {e}");
    assert!(e.contains("UnknownIssuer"), "{e}");
    let e = tls_flow(app.addr, Some(&pki.ca_pem), "billing.example", None, None)
        .await
        .expect_err("a name the certificate does not cover must fail");
    eprintln!("wrong name: {e}");
    assert!(e.contains("NotValidForName"), "{e}");

    // The server kept serving after the failed handshakes.
    tls_flow(app.addr, Some(&pki.ca_pem), "localhost", None, None)
        .await
        .unwrap();
    app.stop().await.unwrap();
}

backends!(mtls_requires_a_client_certificate_from_the_ca);
async fn mtls_requires_a_client_certificate_from_the_ca(db: TestDb) {
    let pki = &pki();
    let app = TestApp::spawn_with(tls_config(&db, pki, true)).await;
    tls_flow(
        app.addr,
        Some(&pki.ca_pem),
        "localhost",
        Some(&pki.client_identity),
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("{:?}: a client with a certificate: {e}", db.backend));

    let e = tls_flow(app.addr, Some(&pki.ca_pem), "localhost", None, None)
        .await
        .expect_err("a client without a certificate must fail under mTLS");
    eprintln!("no client certificate: {e}");
    assert!(e.contains("CertificateRequired"), "{e}");
    let e = tls_flow(
        app.addr,
        Some(&pki.ca_pem),
        "localhost",
        Some(&pki.rogue_identity),
        None,
    )
    .await
    .expect_err("a client certificate from another CA must fail");
    eprintln!("rogue client certificate: {e}");
    assert!(e.contains("UnknownCA"), "{e}");
    let e = plaintext_flow(app.addr)
        .await
        .expect_err("plaintext must fail under mTLS");
    assert!(!e.contains("NotFound"), "a plaintext call was served: {e}");

    tls_flow(
        app.addr,
        Some(&pki.ca_pem),
        "localhost",
        Some(&pki.client_identity),
        None,
    )
    .await
    .unwrap();
    app.stop().await.unwrap();
}

backends!(mtls_and_tokens_together);
async fn mtls_and_tokens_together(db: TestDb) {
    let pki = &pki();
    let (admin, e) = make_token("tls-admin", &[Role::Admin]);
    let mut cfg = tls_config(&db, pki, true);
    cfg.tokens = vec![e];
    let app = TestApp::spawn_with(cfg).await;
    tls_flow(
        app.addr,
        Some(&pki.ca_pem),
        "localhost",
        Some(&pki.client_identity),
        Some(&admin),
    )
    .await
    .unwrap_or_else(|e| panic!("{:?}: certificate and token: {e}", db.backend));
    // A certificate alone is not authentication.
    let e = tls_flow(
        app.addr,
        Some(&pki.ca_pem),
        "localhost",
        Some(&pki.client_identity),
        None,
    )
    .await
    .expect_err("no token");
    assert!(e.contains("Unauthenticated"), "{e}");
    app.stop().await.unwrap();
}

/// Runs the CLI binary with `args`, with no BILLING_MODE_* client settings
/// inherited from the environment, plus `envs`.
async fn cli(args: Vec<String>, envs: Vec<(&'static str, String)>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_billing-mode"));
        for var in [
            "BILLING_MODE_SERVER",
            "BILLING_MODE_TOKEN",
            "BILLING_MODE_CA_CERT",
            "BILLING_MODE_CLIENT_CERT",
            "BILLING_MODE_CLIENT_KEY",
        ] {
            cmd.env_remove(var);
        }
        cmd.args(args).envs(envs).output().expect("run the CLI")
    })
    .await
    .unwrap()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

backends!(the_cli_speaks_mtls_with_a_token);
async fn the_cli_speaks_mtls_with_a_token(db: TestDb) {
    let pki = &pki();
    let (admin, e) = make_token("cli-admin", &[Role::Admin]);
    let mut cfg = tls_config(&db, pki, true);
    cfg.tokens = vec![e];
    let app = TestApp::spawn_with(cfg).await;
    let server = format!("https://localhost:{}", app.addr.port());

    let ws = new_workspace();
    let set = cli(
        vec![
            "set".into(),
            ws.clone(),
            "--runtime".into(),
            "claude-code".into(),
            "--model".into(),
            "opus".into(),
            "--credential-keys".into(),
            "CLAUDE_CODE_OAUTH_TOKEN".into(),
            "--server".into(),
            server.clone(),
            "--ca-cert".into(),
            path(&pki.ca),
            "--client-cert".into(),
            path(&pki.client_cert),
            "--client-key".into(),
            path(&pki.client_key),
            "--token".into(),
            admin.clone(),
        ],
        vec![],
    )
    .await;
    assert!(set.status.success(), "{:?}: cli set: {set:?}", db.backend);

    let full = |ws: &str| {
        vec![
            "resolve".to_owned(),
            ws.to_owned(),
            "--server".into(),
            server.clone(),
            "--ca-cert".into(),
            path(&pki.ca),
            "--client-cert".into(),
            path(&pki.client_cert),
            "--client-key".into(),
            path(&pki.client_key),
            "--token".into(),
            admin.clone(),
        ]
    };
    let ok = cli(full(&ws), vec![]).await;
    assert!(ok.status.success(), "cli resolve over mTLS: {ok:?}");
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(stdout.contains(&ws) && stdout.contains("byok"), "{stdout}");

    // Without the client certificate: refused.
    let no_cert = cli(
        vec![
            "resolve".into(),
            ws.clone(),
            "--server".into(),
            server.clone(),
            "--ca-cert".into(),
            path(&pki.ca),
            "--token".into(),
            admin.clone(),
        ],
        vec![],
    )
    .await;
    assert!(
        !no_cert.status.success(),
        "without a client certificate the CLI must fail: {no_cert:?}"
    );
    // ...saying what the connection may lack, not only tonic's "operation
    // was canceled".
    let said = String::from_utf8_lossy(&no_cert.stderr);
    assert!(said.contains("--client-cert and --client-key"), "{said}");
    // Plaintext to a TLS server: the same, naming https:// too.
    let plain = cli(
        vec![
            "resolve".into(),
            ws.clone(),
            "--server".into(),
            format!("http://localhost:{}", app.addr.port()),
            "--token".into(),
            admin.clone(),
        ],
        vec![],
    )
    .await;
    assert!(!plain.status.success(), "{plain:?}");
    let said = String::from_utf8_lossy(&plain.stderr);
    assert!(said.contains("needs an https:// address"), "{said}");

    // Without the token: refused with UNAUTHENTICATED.
    let mut no_token = full(&ws);
    no_token.truncate(no_token.len() - 2);
    let out = cli(no_token, vec![]).await;
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");

    // The same settings from the environment.
    let out = cli(
        vec!["history".into(), ws.clone()],
        vec![
            ("BILLING_MODE_SERVER", server.clone()),
            ("BILLING_MODE_TOKEN", admin.clone()),
            ("BILLING_MODE_CA_CERT", path(&pki.ca)),
            ("BILLING_MODE_CLIENT_CERT", path(&pki.client_cert)),
            ("BILLING_MODE_CLIENT_KEY", path(&pki.client_key)),
        ],
    )
    .await;
    assert!(out.status.success(), "cli history from env: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("cli-admin"),
        "the actor is listed: {stdout}"
    );
    // The token never appears in the CLI's output.
    assert!(!stdout.contains(&admin));
    app.stop().await.unwrap();
}

backends!(sqlite: the_cli_with_a_ca_cert_speaks_tls_without_an_https_address);
/// A TLS option means TLS, whatever the address looks like. tonic speaks TLS
/// only to an `https://` URL, so `--ca-cert` with the default
/// `http://127.0.0.1:50051` used to be ignored. Now the default address and
/// one without a scheme get `https://` when a TLS option is given, and an
/// explicit `http://` with one is refused, saying what to write instead.
async fn the_cli_with_a_ca_cert_speaks_tls_without_an_https_address(db: TestDb) {
    let pki = &pki();
    let app = TestApp::spawn_with(tls_config(&db, pki, false)).await;
    let bare = format!("localhost:{}", app.addr.port());
    let ws = new_workspace();

    let set = cli(
        vec![
            "set".into(),
            ws.clone(),
            "--runtime".into(),
            "claude-code".into(),
            "--model".into(),
            "opus".into(),
            "--credential-keys".into(),
            "CLAUDE_CODE_OAUTH_TOKEN".into(),
            "--server".into(),
            bare.clone(),
            "--ca-cert".into(),
            path(&pki.ca),
        ],
        vec![],
    )
    .await;
    assert!(set.status.success(), "cli set over TLS: {set:?}");

    // The same from the environment.
    let out = cli(
        vec!["resolve".into(), ws.clone()],
        vec![
            ("BILLING_MODE_SERVER", bare.clone()),
            ("BILLING_MODE_CA_CERT", path(&pki.ca)),
        ],
    )
    .await;
    assert!(out.status.success(), "cli resolve over TLS: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&ws) && stdout.contains("byok"), "{stdout}");

    // An explicit http:// with --ca-cert asks for two opposite things: refused,
    // before anything is sent, with the address to use instead.
    let plain = format!("http://{bare}");
    let out = cli(
        vec![
            "resolve".into(),
            ws.clone(),
            "--server".into(),
            plain.clone(),
            "--ca-cert".into(),
            path(&pki.ca),
        ],
        vec![],
    )
    .await;
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "--server {plain} is plaintext (http://) but --ca-cert asks for TLS: use --server https://{bare}"
        )),
        "{stderr}"
    );

    // Any other scheme (grpcs://, a typo) would be dialled in plaintext,
    // the token in its headers: refused, and nothing is sent.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = format!("grpcs://{}", listener.local_addr().unwrap());
    let connected = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = connected.clone();
    // Each connection is noted and closed at once (a CLI that dials fails
    // fast instead of waiting for a handshake).
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(conn);
        }
    });
    for tls in [true, false] {
        let mut args = vec![
            "resolve".into(),
            ws.clone(),
            "--server".into(),
            other.clone(),
            "--token".into(),
            "bmt_canary".into(),
        ];
        if tls {
            args.extend(["--ca-cert".into(), path(&pki.ca)]);
        }
        let out = cli(args, vec![]).await;
        assert!(!out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("use https://"), "{stderr}");
        assert!(
            !connected.load(std::sync::atomic::Ordering::SeqCst),
            "the CLI connected to {other}: {stderr}"
        );
    }

    // No --server: the default address, over TLS. Nothing trusted by this
    // test's fresh CA serves there, so the call fails, naming the https://
    // URL it tried.
    let out = cli(
        vec![
            "resolve".into(),
            ws.clone(),
            "--ca-cert".into(),
            path(&pki.ca),
        ],
        vec![],
    )
    .await;
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("connecting to https://127.0.0.1:50051"),
        "{stderr}"
    );
    app.stop().await.unwrap();
}

/// A certificate or key that does not parse is a start-up error naming the
/// files, before the store is waited for and before anything says ready:
/// never a server that announced itself and then exited.
#[test]
fn a_tls_key_that_does_not_parse_stops_start_up_before_the_ready_line() {
    let pki = pki();
    let garbage = pki._dir.path().join("garbage.key");
    std::fs::write(
        &garbage,
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let cert = pki.server_cert.to_str().unwrap();
    let key = garbage.to_str().unwrap();
    let stderr = crate::ops::refused_before_the_store(&["--tls-cert", cert, "--tls-key", key]);
    assert!(
        stderr.contains("loading the TLS identity") && stderr.contains(key),
        "names the files:\n{stderr}"
    );
    assert!(!stderr.contains("ready"), "never said ready:\n{stderr}");
}
