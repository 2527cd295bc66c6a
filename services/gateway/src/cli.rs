//! `gateway keys create | list | revoke`: operator API keys from the command line, for the
//! first admin key of an installation and for scripts. Reads the same configuration as the
//! server (only `DATABASE_URL` and `STREAM_PREFIX` matter here). The event goes to the outbox;
//! the scheduler's sweep publishes it.

use std::process::ExitCode;

use checkplane_core::keys::Keys;
use checkplane_wire::operators::{valid_key_id, CreateKeyRequest, NewKey};
use clap::{Arg, ArgMatches, Command};

use crate::config::Config;
use crate::operators;

/// The `keys` command and its subcommands.
pub fn keys_command() -> Command {
    Command::new("keys")
        .about("Create, list and revoke operator API keys")
        .subcommand_required(true)
        .subcommand(
            Command::new("create")
                .about("Create a key and print it (shown this once)")
                .arg(
                    Arg::new("role")
                        .long("role")
                        .required(true)
                        .value_parser(["viewer", "operator", "admin"]),
                )
                .arg(Arg::new("name").long("name").required(true)),
        )
        .subcommand(Command::new("list").about("List keys (never the keys themselves)"))
        .subcommand(
            Command::new("revoke")
                .about("Revoke a key by its id")
                .arg(Arg::new("key_id").required(true)),
        )
}

fn actor() -> String {
    let user = std::env::var("USER").unwrap_or_default();
    let user: String = user
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(32)
        .collect();
    if user.is_empty() {
        // Actors are `<kind>:<name>` (events schema 2).
        checkplane_wire::events::UNKNOWN_CLI_ACTOR.to_owned()
    } else {
        format!("cli:{user}")
    }
}

/// Run `keys <sub>`; exit 0 on success, 1 on failure, 2 on bad arguments.
pub async fn keys(config: Config, args: ArgMatches) -> ExitCode {
    let store = &config.service.store;
    let stream = Keys::new(store.stream_prefix.clone(), store.stream_shards).events("admin");
    if let Err(error) = checkplane_runtime::db::migrate(&store.database).await {
        eprintln!(
            "gateway keys: database: {}",
            checkplane_runtime::error_chain(&error)
        );
        return ExitCode::FAILURE;
    }
    let mut client = match checkplane_runtime::db::connect(&store.database).await {
        Ok(client) => client,
        Err(error) => {
            eprintln!(
                "gateway keys: database: {}",
                checkplane_runtime::error_chain(&error)
            );
            return ExitCode::FAILURE;
        }
    };
    let failed = |error: operators::KeyError| {
        eprintln!("gateway keys: {}", checkplane_runtime::error_chain(&error));
        ExitCode::FAILURE
    };
    match args.subcommand() {
        Some(("create", sub)) => {
            let request = CreateKeyRequest {
                name: sub.get_one::<String>("name").cloned().unwrap_or_default(),
                role: sub.get_one::<String>("role").cloned().unwrap_or_default(),
            };
            let NewKey { name, role } = match request.parse() {
                Ok(valid) => valid,
                Err(message) => {
                    eprintln!("gateway keys create: {message}");
                    return ExitCode::from(2);
                }
            };
            match operators::create_key(&mut client, &stream, &name, role, &actor()).await {
                Ok((created, _)) => {
                    eprintln!(
                        "created key {} ({}, {}); it is shown only now:",
                        created.key_id, created.name, created.role
                    );
                    println!("{}", created.key);
                    ExitCode::SUCCESS
                }
                Err(error) => failed(error),
            }
        }
        Some(("list", _)) => match operators::list(&client).await {
            Ok(keys) => {
                println!("KEY_ID\tNAME\tROLE\tCREATED\tCREATED_BY\tREVOKED");
                for k in keys {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        k.key_id,
                        k.name,
                        k.role,
                        k.created_at,
                        k.created_by,
                        k.revoked_at.unwrap_or_else(|| "-".to_owned())
                    );
                }
                ExitCode::SUCCESS
            }
            Err(error) => failed(error),
        },
        Some(("revoke", sub)) => {
            let key_id = sub.get_one::<String>("key_id").cloned().unwrap_or_default();
            if !valid_key_id(&key_id) {
                eprintln!("gateway keys revoke: not a key id (12 lower-case hex characters)");
                return ExitCode::from(2);
            }
            match operators::revoke_key(&mut client, &stream, &key_id, &actor()).await {
                Ok(Some(_)) => {
                    eprintln!("revoked key {key_id}");
                    // The running gateways forget it at once (else within their cache TTL).
                    let store = &config.service.store;
                    let channel = Keys::new(store.stream_prefix.clone(), store.stream_shards)
                        .auth_invalidations();
                    let told = async {
                        let redis = redis::Client::open(store.redis.connection_info())?;
                        let mut conn = redis.get_multiplexed_async_connection().await?;
                        redis::cmd("PUBLISH")
                            .arg(&channel)
                            .arg(format!("key:{key_id}"))
                            .query_async::<i64>(&mut conn)
                            .await
                    };
                    if let Err(error) = told.await {
                        eprintln!("the running gateways were not told ({error}); they forget the key within GATEWAY_AUTH_CACHE_TTL");
                    }
                    ExitCode::SUCCESS
                }
                Ok(None) => {
                    eprintln!("key {key_id} was revoked already");
                    ExitCode::SUCCESS
                }
                Err(error) => failed(error),
            }
        }
        _ => ExitCode::from(2),
    }
}
