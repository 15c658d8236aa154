//! `miniapp-platformd`: see docs/platform.md.

use std::process::ExitCode;

use clap::Parser;
use miniapp_platformd::{
    cli::{Cli, Command, DatabaseArgs, ServeArgs, SuperappCommand},
    serve,
    tenants::{Claim, hash_secret},
};
use tracing_subscriber::{EnvFilter, fmt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_logs = matches!(&cli.command, Command::Serve(ServeArgs { log_json: true, .. }));
    let filter = EnvFilter::try_from_env("MINIAPP_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json_logs {
        builder.json().init();
    } else {
        builder.init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("miniapp-platformd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("miniapp-platformd: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<ExitCode, BoxError> {
    match command {
        Command::Serve(args) => {
            let running = serve::start(args).await?;
            let stop = running.shutdown_token();
            tokio::spawn(async move {
                wait_for_signal().await;
                stop.cancel();
            });
            running.wait().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { db } => {
            serve::open(&db).await?;
            eprintln!("miniapp-platformd: the database schema is up to date");
            Ok(ExitCode::SUCCESS)
        }
        Command::Superapp { command: SuperappCommand::Add { name, json, server_url, db } } => {
            add_superapp(&db, &name, json, server_url.as_deref()).await
        }
        Command::Superapp { command: SuperappCommand::PublicKey { name, db } } => {
            let db = serve::open(&db).await?;
            let key = miniapp_platformd::vouching::signing_key(db.tenants.as_ref(), &name).await?;
            print!("{}", key.public_key_pem());
            Ok(ExitCode::SUCCESS)
        }
        Command::RegisterApp { app_id, superapp, rotate, json, db } => {
            register_app(&db, &app_id, &superapp, rotate, json).await
        }
    }
}

/// A superapp name: letters, digits, `-`, `_`, `.` (it prefixes its users' uids with a `/`).
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

async fn add_superapp(
    db: &DatabaseArgs,
    name: &str,
    json: bool,
    server_url: Option<&str>,
) -> Result<ExitCode, BoxError> {
    if !valid_name(name) {
        return Err(format!("superapp name {name:?}: 1-64 letters, digits, '-', '_' or '.'").into());
    }
    if let Some(url) = server_url
        && !(url.starts_with("https://") || url.starts_with("http://"))
    {
        return Err(format!("--server-url must be http(s)://HOST[:PORT], not {url:?}").into());
    }
    let db = serve::open(db).await?;
    let client_key = format!("ck_{}", miniapp_platform::tokens::random_token(16));
    let client_secret = miniapp_platform::tokens::random_token(32);
    if !db.tenants.add_superapp(name, &client_key, &hash_secret(&client_secret), server_url).await? {
        return Err(format!("a superapp named {name} exists already (its secret is not shown again)").into());
    }
    if server_url.is_some() {
        // Made now, so that `superapp public-key` prints it at once and no call waits for it.
        miniapp_platformd::vouching::signing_key(db.tenants.as_ref(), name).await?;
    }
    if json {
        println!("{}", serde_json::json!({ "client_key": client_key, "client_secret": client_secret }));
    } else {
        println!("client_key: {client_key}\nclient_secret: {client_secret}");
        eprintln!("miniapp-platformd: superapp {name} added; the secret is shown only now");
    }
    Ok(ExitCode::SUCCESS)
}

async fn register_app(
    args: &DatabaseArgs,
    app_id: &str,
    superapp: &str,
    rotate: bool,
    json: bool,
) -> Result<ExitCode, BoxError> {
    if app_id.is_empty() || app_id.len() > 128 {
        return Err("an app id is 1-128 bytes".into());
    }
    let db = serve::open(args).await?;
    match db.tenants.claim_app(app_id, superapp).await? {
        Claim::Ours => {}
        Claim::NoSuperapp => return Err(format!("no superapp named {superapp} (superapp add {superapp})").into()),
        Claim::OtherSuperapp => return Err(format!("{app_id} is registered to another superapp").into()),
    }
    let tenants = std::sync::Arc::new(miniapp_platformd::tenants::Tenants::new(db.tenants.clone()));
    let platform = serve::platform(&db, &ServeArgs::for_commands(args.clone()), &tenants).await?;
    let Some(secret) = miniapp_platform::Platform::register_app(&*platform, app_id, rotate).await? else {
        return Err(format!("{app_id} has a secret already; pass --rotate to replace it").into());
    };
    if json {
        println!("{}", serde_json::json!({ "app_id": app_id, "secret": secret }));
    } else {
        println!("app_id: {app_id}\nsecret: {secret}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
