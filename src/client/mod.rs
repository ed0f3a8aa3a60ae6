//! The operator CLI's commands: the RPCs for operators without grpcurl.
//! `main.rs` parses the command line and calls in here; names of modes,
//! sources and origins come from [`crate::wire::names`], as the server's do.
//!
//! Output is plain text, or JSON with `--json`. Env values are redacted
//! unless `--show-values` is given. Errors print the status code, the
//! ErrorInfo reason and the message, and exit non-zero.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Args;
use serde_json::{json, Map, Value};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{interceptor::InterceptedService, Interceptor},
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
    Request, Status,
};
use tonic_types::StatusExt;

use crate::{
    proto::{self, billing_mode_client::BillingModeClient},
    wire::names,
};

/// Writes to standard output, as `print!` does, through [`write_stdout`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::client::write_stdout(format_args!($($arg)*))
    };
}

/// Writes a line to standard output, as `println!` does, through
/// [`write_stdout`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::client::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub mod adopt;
pub mod watch;

/// Writes to standard output and flushes. A reader that has gone away (`|
/// head`, a closed pager) ends the command at once and quietly, with the
/// status a program killed by `SIGPIPE` has (141), as `cat` ends: there is
/// nobody left to tell, and `print!` would panic. Any other failure to write
/// is said on standard error, exit status 1.
pub fn write_stdout(text: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(text).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("error: writing to standard output: {e}");
        std::process::exit(1);
    }
}

#[derive(Args, Clone)]
pub struct ClientArgs {
    /// The server, e.g. https://billing-mode:50051 [default:
    /// http://127.0.0.1:50051, or https://127.0.0.1:50051 with a TLS option].
    /// Without a scheme (billing-mode:50051): https:// with a TLS option,
    /// http:// without; an http:// address with a TLS option is refused.
    #[arg(long, env = "BILLING_MODE_SERVER")]
    server: Option<String>,
    /// Bearer token.
    #[arg(long, env = "BILLING_MODE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to verify the server with (implies TLS).
    #[arg(long, env = "BILLING_MODE_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS (implies TLS).
    #[arg(long, env = "BILLING_MODE_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mTLS.
    #[arg(long, env = "BILLING_MODE_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Server name to verify in the certificate (default: the server's host;
    /// implies TLS).
    #[arg(long)]
    tls_server_name: Option<String>,
    /// How long to wait for each answer (e.g. 30s, 500ms, 2m); a server that
    /// does not answer by then is an error, not a wait without end. A Watch
    /// waits this long for its stream to open, not for its events.
    #[arg(long, env = "BILLING_MODE_TIMEOUT", default_value = "30s",
          value_parser = parse_timeout)]
    timeout: std::time::Duration,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A duration above zero.
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    match crate::config::parse_duration(s)? {
        d if d.is_zero() => Err("the timeout must be above zero".to_owned()),
        d => Ok(d),
    }
}

/// The token is not shown.
impl std::fmt::Debug for ClientArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientArgs")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_cert", &self.ca_cert)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("tls_server_name", &self.tls_server_name)
            .field("timeout", &self.timeout)
            .field("json", &self.json)
            .finish()
    }
}

#[derive(Args, Debug)]
pub struct ResolveArgs {
    /// The workspace id (UUID).
    workspace: String,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct SetArgs {
    /// The workspace id (UUID).
    workspace: String,
    /// Operator override: platform_managed, byok or disabled (admin; needs --reason).
    #[arg(long = "override")]
    override_mode: Option<String>,
    /// Runtime, e.g. claude-code; "" clears it.
    #[arg(long)]
    runtime: Option<String>,
    /// Model, e.g. opus; "" clears it.
    #[arg(long)]
    model: Option<String>,
    /// Comma-separated names of the credentials the workspace owns; replaces
    /// the whole set ("" clears it).
    #[arg(long)]
    credential_keys: Option<String>,
    /// Compare-and-set: the revision you last saw (0: create only).
    #[arg(long)]
    expected_revision: Option<u64>,
    /// Why (recorded in the audit log).
    #[arg(long, default_value = "")]
    reason: String,
    /// Check the write and print the decision it would produce, writing nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct ClearArgs {
    /// The workspace id (UUID).
    workspace: String,
    /// Why (required).
    #[arg(long, default_value = "")]
    reason: String,
    /// Compare-and-set: the revision you last saw.
    #[arg(long)]
    expected_revision: Option<u64>,
    /// Check the write and print the decision it would produce, writing nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct BuildEnvArgs {
    /// The workspace id (UUID).
    workspace: String,
    /// Candidate env: lines `ORIGIN KEY=VALUE` (ORIGIN: workspace, global,
    /// platform; `#` comments), or a JSON array of {"key","value","origin"};
    /// `-` reads standard input.
    #[arg(long)]
    env_file: PathBuf,
    /// Print env values (redacted by default).
    #[arg(long)]
    show_values: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// The workspace id (UUID).
    workspace: String,
    /// Entries per page (1-500; default 50).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=500))]
    page_size: u32,
    /// Continue from a previous page's next_page_token.
    #[arg(long, default_value = "")]
    page_token: String,
    #[command(flatten)]
    client: ClientArgs,
}

/// The `authorization: Bearer <token>` metadata every call carries, when a
/// token is given: the one interceptor of the CLI and the importer.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

/// The token is not shown.
impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Bearer")
            .field(&self.0.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Bearer {
    /// The header for `token`; none without one.
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        let header = token
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .context("the token is not valid header text")?;
        Ok(Bearer(header))
    }

    /// Adds the header to `request`.
    pub fn apply<T>(&self, request: &mut Request<T>) {
        if let Some(h) = &self.0 {
            request.metadata_mut().insert("authorization", h.clone());
        }
    }
}

/// A ready `authorization` value (`Bearer <token>`), sent as is.
impl From<MetadataValue<Ascii>> for Bearer {
    fn from(header: MetadataValue<Ascii>) -> Self {
        Bearer(Some(header))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        self.apply(&mut request);
        Ok(request)
    }
}

/// The generated client, every call with the bearer header.
pub type Client = BillingModeClient<InterceptedService<Channel, Bearer>>;

/// The server `--server` leaves out: the one `billing-mode serve` listens on
/// by default.
const DEFAULT_SERVER: &str = "127.0.0.1:50051";

/// The URL to connect to: `--server` with its scheme settled. A TLS option
/// (`--ca-cert`, `--client-cert`/`--client-key`, `--tls-server-name`) means
/// TLS, which tonic speaks only to an `https://` URL: the default address
/// and one without a scheme get `https://` then (`http://` otherwise); an
/// explicit `http://` is refused, not quietly sent in plaintext with the
/// TLS options ignored, as the two ask for opposite things. Any scheme but
/// those two is refused: tonic would connect to it in plaintext, TLS
/// options or not, and send the token.
fn server_url(args: &ClientArgs) -> anyhow::Result<String> {
    let tls_option = [
        (args.ca_cert.is_some(), "--ca-cert"),
        (args.client_cert.is_some(), "--client-cert"),
        (args.client_key.is_some(), "--client-key"),
        (args.tls_server_name.is_some(), "--tls-server-name"),
    ]
    .into_iter()
    .find_map(|(given, name)| given.then_some(name));
    let implied = if tls_option.is_some() {
        "https"
    } else {
        "http"
    };
    let server = args.server.as_deref().unwrap_or(DEFAULT_SERVER);
    match server.split_once("://") {
        None => Ok(format!("{implied}://{server}")),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => match tls_option {
            Some(option) => anyhow::bail!(
                "--server {server} is plaintext (http://) but {option} asks for TLS: \
                 use --server https://{rest}, or leave out the TLS options"
            ),
            None => Ok(server.to_owned()),
        },
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => Ok(server.to_owned()),
        Some((scheme, rest)) => anyhow::bail!(
            "--server {server}: the scheme {scheme}:// is not one this client speaks; \
             use https://{rest} (TLS) or http://{rest} (plaintext)"
        ),
    }
}

/// The channel to `--server` and the bearer header to send.
pub async fn channel(args: &ClientArgs) -> anyhow::Result<(Channel, Bearer)> {
    let server = server_url(args)?;
    let mut endpoint = Channel::from_shared(server.clone())
        .with_context(|| format!("--server {server:?} is not a URL"))?
        .connect_timeout(std::time::Duration::from_secs(5).min(args.timeout))
        // Until the answer's headers, which a unary answer sends with its
        // message and a stream when it opens (tonic's `Endpoint::timeout`).
        .timeout(args.timeout);
    let tls_wanted = endpoint
        .uri()
        .scheme_str()
        .is_some_and(|s| s.eq_ignore_ascii_case("https"));
    if tls_wanted {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &args.ca_cert {
            tls = tls.ca_certificate(Certificate::from_pem(crate::config::read_pem(ca)?));
        }
        if let (Some(c), Some(k)) = (&args.client_cert, &args.client_key) {
            let cert = crate::config::read_pem(c)?;
            let key = crate::config::read_pem(k)?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &args.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint.connect().await.context(Unreachable(server))?;
    Ok((channel, Bearer::new(args.token.as_deref())?))
}

/// The server at this address could not be reached (an error's context,
/// which [`print_error`] gives the code `Unavailable`).
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connecting to {}", self.0)
    }
}

pub async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    let (channel, bearer) = channel(args).await?;
    Ok(BillingModeClient::with_interceptor(channel, bearer))
}

/// Runs a client command: prints the result, or the error and exits 1.
pub async fn run<F>(json_out: bool, f: F) -> ExitCode
where
    F: std::future::Future<Output = anyhow::Result<(Value, String)>>,
{
    match f.await {
        Ok((j, text)) => {
            if json_out {
                outln!("{}", serde_json::to_string_pretty(&j).unwrap_or_default());
            } else {
                out!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_error(json_out, &e, Map::new());
            ExitCode::FAILURE
        }
    }
}

/// Says an error the way every command does: `error: CODE REASON: message`
/// on standard error and, with `--json`, `{"error": {"code", "reason",
/// "message"}}` on standard output (an error that is no RPC's refusal has
/// only a `message`). `extra` adds fields to the `error` object (`watch`
/// says there where to resume).
pub fn print_error(json_out: bool, e: &anyhow::Error, extra: Map<String, Value>) {
    let (mut fields, text) = match e.downcast_ref::<Status>() {
        Some(s) => {
            let reason = status_reason(s);
            // The client's own deadline (`--timeout`): tonic says only
            // "Timeout expired", as a cancellation.
            let timed_out = s.code() == tonic::Code::Cancelled
                && std::iter::successors(std::error::Error::source(s), |c| c.source())
                    .any(|c| c.is::<tonic::TimeoutExpired>() || c.to_string() == "Timeout expired");
            // The connection ended without a gRPC answer (this server answers
            // every refusal with a reason): tonic says "transport error",
            // "operation was canceled" or "h2 protocol error", which name no
            // cause. The usual ones
            // at this end are the connection's security.
            let cut = !timed_out
                && reason.is_empty()
                && (matches!(s.code(), tonic::Code::Unknown | tonic::Code::Cancelled)
                    || (s.code() == tonic::Code::Internal
                        && s.message().contains("h2 protocol error")));
            let (code, message) = if timed_out {
                (
                    tonic::Code::DeadlineExceeded,
                    "no answer from the server within --timeout".to_owned(),
                )
            } else if cut {
                (
                    tonic::Code::Unavailable,
                    format!(
                        "the connection ended without an answer ({}). A server that speaks TLS \
                         needs an https:// address or --ca-cert; one that asks for client \
                         certificates needs --client-cert and --client-key",
                        s.message()
                    ),
                )
            } else {
                (s.code(), s.message().to_owned())
            };
            let text = if reason.is_empty() {
                format!("error: {code:?}: {message}")
            } else {
                format!("error: {code:?} {reason}: {message}")
            };
            let mut fields = Map::new();
            fields.insert("code".into(), format!("{code:?}").into());
            fields.insert("reason".into(), reason.into());
            fields.insert("message".into(), message.into());
            (fields, text)
        }
        None => {
            let mut fields = Map::new();
            // The server could not be reached: a caller's script retries
            // this as it would an UNAVAILABLE answer (a TLS option that
            // cannot be read is not this).
            if e.downcast_ref::<Unreachable>().is_some() {
                fields.insert("code".into(), "Unavailable".into());
                fields.insert("reason".into(), "".into());
            }
            let text = crate::service::error::anyhow_text(e);
            fields.insert("message".into(), text.clone().into());
            (fields, format!("error: {text}"))
        }
    };
    if json_out {
        fields.extend(extra);
        outln!("{}", json!({ "error": fields }));
    }
    eprintln!("{text}");
}

/// The `google.rpc.ErrorInfo` reason of a refusal; "" when it has none.
pub fn status_reason(s: &Status) -> String {
    s.get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// A mode's name; "" when unspecified.
pub fn mode_name(v: i32) -> &'static str {
    names::mode_name(v).unwrap_or("")
}

/// A source's name; "" when unspecified.
pub fn source_name(v: i32) -> &'static str {
    names::source_name(v).unwrap_or("")
}

fn origin_name(v: i32) -> &'static str {
    names::origin_name(v).unwrap_or("unspecified")
}

/// A response message as `--json` prints it: protobuf's JSON mapping
/// (serde generated by pbjson-build: lowerCamelCase names, enums by their
/// proto names, default values omitted), in the proto's field order (the
/// `Value` keeps the order it was written in: serde_json's
/// `preserve_order`), as grpcurl prints it.
pub fn message_json<T: serde::Serialize>(message: &T) -> anyhow::Result<Value> {
    serde_json::to_value(message).context("the answer cannot be written as JSON")
}

fn resolution_text(r: &proto::Resolution) -> String {
    let or_none = |s: &str| {
        if s.is_empty() {
            "(none)".to_owned()
        } else {
            s.to_owned()
        }
    };
    let mut out = format!(
        "workspace:   {}\nmode:        {}\nsource:      {}\nprovider:    {}{}\nruntime:     {}\nmodel:       {}\noverride:    {}\nrevision:    {}\ncredentials: {}\n",
        r.workspace_id,
        mode_name(r.mode),
        source_name(r.source),
        or_none(&r.provider),
        if r.provider.is_empty() { "" } else if r.provider_is_platform { " (platform)" } else { " (customer)" },
        or_none(&r.runtime),
        or_none(&r.model),
        or_none(mode_name(r.override_mode)),
        r.revision,
        or_none(&r.credential_keys.join(", ")),
    );
    if !r.forbidden_secret_keys.is_empty() {
        out += &format!(
            "forbidden secret keys: {}\n",
            r.forbidden_secret_keys.join(", ")
        );
    }
    out += "trace:\n";
    for t in &r.trace {
        out += &format!("  - {t}\n");
    }
    out
}

/// The text form of an answer carrying a resolution.
fn decided_text(r: &Option<proto::Resolution>) -> anyhow::Result<String> {
    let r = r.as_ref().context("the server returned no resolution")?;
    Ok(resolution_text(r))
}

/// A write's answer; a dry run says so (on standard error with `--json`,
/// whose standard output is the response message).
fn decided_maybe_dry<T: serde::Serialize>(
    response: &T,
    r: &Option<proto::Resolution>,
    a: &ClientArgs,
    dry_run: bool,
) -> anyhow::Result<(Value, String)> {
    let text = decided_text(r)?;
    let json = message_json(response)?;
    if !dry_run {
        return Ok((json, text));
    }
    if a.json {
        eprintln!("dry run: nothing was written");
    }
    Ok((json, format!("dry run: nothing was written\n{text}")))
}

pub async fn resolve(a: ResolveArgs) -> ExitCode {
    run(a.client.json, async {
        let mut c = connect(&a.client).await?;
        let r = c
            .resolve(proto::ResolveRequest {
                workspace_id: a.workspace.clone(),
            })
            .await?
            .into_inner();
        Ok((message_json(&r)?, decided_text(&r.resolution)?))
    })
    .await
}

fn parse_mode(s: &str) -> anyhow::Result<proto::Mode> {
    names::parse_mode(s)
        .with_context(|| format!("--override {s:?}: use platform_managed, byok or disabled"))
}

pub async fn set(a: SetArgs) -> ExitCode {
    run(a.client.json, async {
        let override_mode = a.override_mode.as_deref().map(parse_mode).transpose()?;
        let credential_keys = a.credential_keys.as_ref().map(|s| proto::CredentialKeys {
            keys: s
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect(),
        });
        let mut c = connect(&a.client).await?;
        let r = c
            .set(proto::SetRequest {
                workspace_id: a.workspace.clone(),
                override_mode: override_mode.map(Into::into),
                runtime: a.runtime.clone(),
                model: a.model.clone(),
                credential_keys,
                expected_revision: a.expected_revision,
                reason: a.reason.clone(),
                dry_run: a.dry_run,
            })
            .await?
            .into_inner();
        decided_maybe_dry(&r, &r.resolution, &a.client, a.dry_run)
    })
    .await
}

pub async fn clear(a: ClearArgs) -> ExitCode {
    run(a.client.json, async {
        let mut c = connect(&a.client).await?;
        let r = c
            .clear(proto::ClearRequest {
                workspace_id: a.workspace.clone(),
                expected_revision: a.expected_revision,
                reason: a.reason.clone(),
                dry_run: a.dry_run,
            })
            .await?
            .into_inner();
        decided_maybe_dry(&r, &r.resolution, &a.client, a.dry_run)
    })
    .await
}

fn parse_origin(s: &str) -> anyhow::Result<proto::Origin> {
    // The text is not echoed: a malformed line may hold a secret value.
    names::parse_origin(s).context("the origin must be workspace, global or platform")
}

/// A JSON input the CLI could not read, as it is said: where (line and
/// column) and what kind of fault, never the text. serde's own message quotes
/// what it refused (`invalid type: string "ANTHROPIC_API_KEY=sk-…", expected
/// …`), and a malformed entry may be a pasted credential; the error returned
/// has no source, so `{e:#}` prints this and nothing more. `expected` says
/// what the input should hold.
pub fn json_input_error(e: &serde_json::Error, expected: &str) -> anyhow::Error {
    use serde_json::error::Category;
    let fault = match e.classify() {
        Category::Syntax => "not valid JSON".to_owned(),
        Category::Eof => "the JSON ends too early".to_owned(),
        Category::Data => format!("expected {expected}"),
        Category::Io => "could not be read".to_owned(),
    };
    anyhow::anyhow!("line {}, column {}: {fault}", e.line(), e.column())
}

/// Reads a candidate env file: `ORIGIN KEY=VALUE` lines or a JSON array.
pub fn parse_env_file(text: &str) -> anyhow::Result<Vec<proto::EnvVar>> {
    if text.trim_start().starts_with('[') {
        #[derive(serde::Deserialize)]
        struct Entry {
            key: String,
            #[serde(default)]
            value: String,
            origin: String,
        }
        let entries: Vec<Entry> = serde_json::from_str(text)
            .map_err(|e| {
                json_input_error(
                    &e,
                    r#"an array of {"key", "value", "origin"} objects whose fields are strings"#,
                )
            })
            .context("reading the JSON env")?;
        return entries
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                Ok(proto::EnvVar {
                    origin: parse_origin(&e.origin)
                        .with_context(|| format!("reading the JSON env: entry {}", i + 1))?
                        .into(),
                    key: e.key,
                    value: e.value,
                })
            })
            .collect();
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (origin, rest) = line
            .split_once(char::is_whitespace)
            .with_context(|| format!("line {}: expected `ORIGIN KEY=VALUE`", i + 1))?;
        let (key, value) = rest
            .trim_start()
            .split_once('=')
            .with_context(|| format!("line {}: expected `ORIGIN KEY=VALUE`", i + 1))?;
        out.push(proto::EnvVar {
            key: key.to_owned(),
            value: value.to_owned(),
            origin: parse_origin(origin)
                .with_context(|| format!("line {}", i + 1))?
                .into(),
        });
    }
    Ok(out)
}

pub async fn build_env(a: BuildEnvArgs) -> ExitCode {
    run(a.client.json, async {
        let text = if a.env_file.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading standard input")?
        } else {
            std::fs::read_to_string(&a.env_file)
                .with_context(|| format!("reading {}", a.env_file.display()))?
        };
        let env = parse_env_file(&text)?;
        let mut c = connect(&a.client).await?;
        let r = c
            .build_env(proto::BuildEnvRequest {
                workspace_id: a.workspace.clone(),
                env,
            })
            .await?
            .into_inner();
        let res = r
            .resolution
            .clone()
            .context("the server returned no resolution")?;
        let shown = |v: &str| {
            if a.show_values {
                v.to_owned()
            } else if v.is_empty() {
                String::new()
            } else {
                "<redacted>".to_owned()
            }
        };
        // The response as it came, its values redacted unless asked.
        let mut shown_response = r.clone();
        for e in &mut shown_response.env {
            e.value = shown(&e.value);
        }
        let j = message_json(&shown_response)?;
        let mut text = resolution_text(&res);
        text += "env:\n";
        for e in &r.env {
            text += &format!(
                "  {}={}  ({})\n",
                e.key,
                shown(&e.value),
                origin_name(e.origin)
            );
        }
        let keys = |k: &[String]| {
            if k.is_empty() {
                "(none)".to_owned()
            } else {
                k.join(", ")
            }
        };
        text += &format!("removed: {}\n", keys(&r.removed_keys));
        text += &format!("added:   {}\n", keys(&r.added_keys));
        Ok((j, text))
    })
    .await
}

fn fields_text(f: &Option<proto::RecordFields>) -> String {
    match f {
        None => "(no record)".to_owned(),
        Some(f) => {
            let or_none = |s: &str| {
                if s.is_empty() {
                    "(none)".to_owned()
                } else {
                    s.to_owned()
                }
            };
            format!(
                "runtime={} model={} credential_keys=[{}] override={}",
                or_none(&f.runtime),
                or_none(&f.model),
                f.credential_keys.join(","),
                or_none(&f.override_mode)
            )
        }
    }
}

pub async fn history(a: HistoryArgs) -> ExitCode {
    run(a.client.json, async {
        let mut c = connect(&a.client).await?;
        let r = c
            .history(proto::HistoryRequest {
                workspace_id: a.workspace.clone(),
                page_size: a.page_size,
                page_token: a.page_token.clone(),
            })
            .await?
            .into_inner();
        let time = |e: &proto::AuditEntry| {
            e.time
                .as_ref()
                .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
                .map(|t| t.to_rfc3339())
                .unwrap_or_default()
        };
        let mut text = String::new();
        for e in &r.entries {
            text += &format!(
                "revision {} at {} by {}{}\n  before: {}\n  after:  {}\n",
                e.revision,
                time(e),
                e.actor,
                if e.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", e.reason)
                },
                fields_text(&e.before),
                fields_text(&e.after),
            );
        }
        if !r.next_page_token.is_empty() {
            text += &format!("next page: --page-token {}\n", r.next_page_token);
        }
        Ok((message_json(&r)?, text))
    })
    .await
}

#[derive(Args, Debug)]
pub struct DriftArgs {
    /// Entries fetched per request (1-500); every page is fetched.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=500))]
    page_size: u32,
    #[command(flatten)]
    client: ClientArgs,
}

pub fn timestamp_text(t: &Option<crate::wire::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}

/// Every instance whose applied mode differs from the current decision,
/// oldest first, as a table (or JSON).
pub async fn drift(a: DriftArgs) -> ExitCode {
    run(a.client.json, async {
        let mut c = connect(&a.client).await?;
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let r = c
                .list_drift(proto::ListDriftRequest {
                    page_size: a.page_size,
                    page_token: page_token.clone(),
                })
                .await?
                .into_inner();
            all.extend(r.drift);
            if r.next_page_token.is_empty() {
                break;
            }
            page_token = r.next_page_token;
        }
        let rows: Vec<[String; 5]> = all
            .iter()
            .map(|d| {
                let (mode, revision) = d
                    .current
                    .as_ref()
                    .map_or(("", 0), |r| (mode_name(r.mode), r.revision));
                [
                    d.workspace_id.clone(),
                    d.instance.clone(),
                    format!("{}@{}", mode_name(d.applied_mode), d.applied_revision),
                    format!("{mode}@{revision}"),
                    timestamp_text(&d.since),
                ]
            })
            .collect();
        // Every page as one response: the shape of one ListDrift answer.
        let j = message_json(&proto::ListDriftResponse {
            drift: all.clone(),
            next_page_token: String::new(),
        })?;
        let header = ["WORKSPACE", "INSTANCE", "APPLIED", "CURRENT", "SINCE"];
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: [&str; 5]| {
            let mut l = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i + 1 == cells.len() {
                    l += cell;
                } else {
                    l += &format!("{cell:<w$}  ");
                }
            }
            l + "\n"
        };
        let mut text = line(header);
        for row in &rows {
            text += &line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
        }
        if rows.is_empty() {
            text = "no drift: every reported instance runs the current decision's mode\n".into();
        }
        Ok((j, text))
    })
    .await
}

#[derive(Args, Debug)]
pub struct CheckSpendArgs {
    /// The workspace id (UUID).
    workspace: String,
    #[command(flatten)]
    client: ClientArgs,
}

/// The metering proxy's question: may the platform pay for this workspace's
/// LLM calls now?
pub async fn check_spend(a: CheckSpendArgs) -> ExitCode {
    run(a.client.json, async {
        let mut c = connect(&a.client).await?;
        let r = c
            .check_spend(proto::CheckSpendRequest {
                workspace_id: a.workspace.clone(),
            })
            .await?
            .into_inner();
        let as_of = timestamp_text(&r.as_of);
        let j = message_json(&r)?;
        let text = format!(
            "allowed:  {}\nmode:     {}\nrevision: {}\nas of:    {}\n",
            if r.allowed { "yes" } else { "no" },
            mode_name(r.mode),
            r.revision,
            as_of
        );
        Ok((j, text))
    })
    .await
}
