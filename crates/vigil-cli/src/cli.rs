//! vigilctl's command line: global flags, the built-in commands, and one
//! subcommand per resource kind (built from [`crate::kinds::KINDS`]).

use std::path::PathBuf;

use clap::{ArgMatches, Args, CommandFactory as _, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::kinds::{Kind, KINDS};

const ABOUT: &str = "Manage a Vigil deployment through the control plane's admin API";
const GLOBAL: &str = "Global options";

/// Flags every command takes, before or after the subcommand.
#[derive(Parser, Debug, Default)]
#[command(
    name = "vigilctl",
    version,
    after_help = "Endpoint and token: --endpoint/--token, else VIGIL_ENDPOINT/VIGIL_TOKEN, else the \
                  config file (`vigilctl config set`), else http://127.0.0.1:8080.",
    subcommand_required = true,
    arg_required_else_help = true
)]
pub struct Global {
    /// Base URL of the admin API.
    #[arg(long, global = true, value_name = "URL", help_heading = GLOBAL)]
    pub endpoint: Option<String>,
    /// Bearer token for the admin API (`config set --token -` reads it from standard input).
    #[arg(long, global = true, value_name = "TOKEN", help_heading = GLOBAL)]
    pub token: Option<String>,
    /// Output format [default: table for lists, json for single resources].
    #[arg(short, long, global = true, value_enum, help_heading = GLOBAL)]
    pub output: Option<Output>,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Columns for people.
    Table,
    /// The API's JSON.
    Json,
}

/// Commands that are not about one kind of resource.
#[derive(Subcommand, Debug)]
pub enum Builtin {
    /// Show or change the stored endpoint and token.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The proxies of the fleet: the snapshot version each holds, connected or last seen.
    #[command(visible_alias = "proxies")]
    Fleet,
    /// Create or update the resources in a file by name (documents with a `kind` field).
    Apply(ApplyArgs),
    /// The audit trail of writes, oldest first.
    Audit(AuditArgs),
}

/// `vigilctl config ...`.
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Store the --endpoint and/or --token given (`--token -` reads the token from standard input).
    Set,
    /// Print the configuration in effect, token redacted.
    Show,
}

/// `vigilctl apply`.
#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// A JSON file holding a document or an array of documents, or `-` for standard input.
    #[arg(short, long, value_name = "FILE")]
    pub file: PathBuf,
}

/// `vigilctl audit`.
#[derive(Args, Debug)]
pub struct AuditArgs {
    /// Only events about this kind (any name of it: `policy`, `service-accounts`).
    #[arg(long)]
    pub kind: Option<String>,
    /// Only events about this id.
    #[arg(long)]
    pub entity_id: Option<String>,
    /// Only events by this actor (`bootstrap`, `admin-token:<name>`).
    #[arg(long)]
    pub actor: Option<String>,
    /// At most this many events [default: all].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: Option<u32>,
}

/// The JSON document of a create or update.
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct Input {
    /// A JSON file, or `-` for standard input.
    #[arg(short, long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The JSON document itself.
    #[arg(short, long, value_name = "JSON")]
    pub data: Option<String>,
}

/// `vigilctl <kind> list`.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// At most this many [default: all, page by page].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: Option<u32>,
    /// Only those whose field has this value (the filters each kind takes are in
    /// /v1/openapi.json, e.g. `--filter status=suspended` for users). Repeatable.
    #[arg(long, value_name = "FIELD=VALUE", value_parser = parse_filter)]
    pub filter: Vec<(String, String)>,
    /// Start from this cursor (a `next_cursor` printed by `-o json`).
    #[arg(long)]
    pub cursor: Option<String>,
}

fn parse_filter(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not FIELD=VALUE")),
    }
}

/// `vigilctl <kind> update`.
#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// The id (the name, for named kinds).
    pub id: String,
    #[command(flatten)]
    pub input: Input,
    /// Send a JSON merge patch (RFC 7396) instead of the whole document.
    #[arg(long)]
    pub merge: bool,
    /// The version the change is based on [default: the document's `version`].
    #[arg(long, value_name = "VERSION", conflicts_with = "force")]
    pub if_match: Option<String>,
    /// Overwrite whatever version is stored (`If-Match: *`).
    #[arg(long)]
    pub force: bool,
}

/// What every kind supports.
#[derive(Subcommand, Debug)]
pub enum Verb {
    /// List them (a table of key columns; all fields with -o json).
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show one, as JSON.
    Get {
        /// The id (the name, for named kinds).
        id: String,
    },
    /// Create one from a JSON document.
    Create(Input),
    /// Replace one (or merge-patch it with --merge), guarded by the version read:
    /// `get` it, edit the JSON (keeping `version`), `update -f` it.
    Update(UpdateArgs),
    /// Delete one.
    #[command(visible_alias = "rm")]
    Delete {
        /// The id (the name, for named kinds).
        id: String,
        /// Only if the stored version is still this one.
        #[arg(long, value_name = "VERSION")]
        if_match: Option<String>,
    },
}

/// Actions some kinds have besides CRUD (each kind lists its own in [`Kind::actions`]).
#[derive(Subcommand, Debug)]
pub enum Action {
    /// Check a policy (a policy resource, or `{"document": ...}`, or the bare document) without storing it.
    Validate(Input),
    /// Issue a new token, shown once; the old one stops working.
    RotateToken {
        /// The name.
        id: String,
        /// Only if the stored version is still this one.
        #[arg(long, value_name = "VERSION")]
        if_match: Option<String>,
    },
    /// Revoke the session.
    Revoke {
        /// The session id.
        id: String,
    },
    /// Revoke every live session of the user.
    RevokeSessions {
        /// The user id.
        id: String,
    },
}

/// A kind's command.
#[derive(Debug)]
pub enum KindCommand {
    /// CRUD.
    Verb(Verb),
    /// Something else.
    Action(Action),
}

/// What was asked.
#[derive(Debug)]
pub enum Invocation {
    /// A built-in command.
    Builtin(Builtin),
    /// A command on one kind of resource.
    Kind(&'static Kind, KindCommand),
}

/// A parsed command line.
#[derive(Debug)]
pub struct Parsed {
    /// The global flags.
    pub global: Global,
    /// The command.
    pub invocation: Invocation,
}

/// The whole command line, kinds included.
pub fn command() -> clap::Command {
    // Augmenting sets the enum's doc comment as the command's; each `about` follows it.
    let mut cmd = Builtin::augment_subcommands(Global::command())
        .about(ABOUT)
        .long_about(None);
    let actions = Action::augment_subcommands(clap::Command::new("actions"));
    for kind in KINDS {
        let mut sub = Verb::augment_subcommands(
            clap::Command::new(kind.path)
                .visible_alias(kind.singular)
                .aliases(kind.aliases.iter().copied())
                .subcommand_required(true)
                .arg_required_else_help(true),
        )
        .about(kind.about)
        .long_about(None);
        for a in actions.get_subcommands() {
            if kind.actions.contains(&a.get_name()) {
                // After the CRUD verbs.
                sub = sub.subcommand(a.clone().display_order(100));
            }
        }
        cmd = cmd.subcommand(sub);
    }
    cmd
}

/// Parses a command line (the program name first).
pub fn parse_from<I, T>(args: I) -> Result<Parsed, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut cmd = command();
    let m = cmd.try_get_matches_from_mut(args)?;
    from_matches(&m).map_err(|e| e.format(&mut cmd))
}

fn from_matches(m: &ArgMatches) -> Result<Parsed, clap::Error> {
    let global = Global::from_arg_matches(m)?;
    let missing = || clap::Error::new(clap::error::ErrorKind::MissingSubcommand);
    let (name, sub) = m.subcommand().ok_or_else(missing)?;
    let invocation = match KINDS.iter().find(|k| k.path == name) {
        Some(kind) => {
            let (verb, _) = sub.subcommand().ok_or_else(missing)?;
            let command = if Verb::has_subcommand(verb) {
                KindCommand::Verb(Verb::from_arg_matches(sub)?)
            } else {
                KindCommand::Action(Action::from_arg_matches(sub)?)
            };
            Invocation::Kind(kind, command)
        }
        None => Invocation::Builtin(Builtin::from_arg_matches(m)?),
    };
    Ok(Parsed { global, invocation })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> Result<Parsed, clap::Error> {
        parse_from(std::iter::once("vigilctl").chain(args.split_whitespace()))
    }

    fn kind_of(args: &str) -> &'static str {
        match parse(args).unwrap().invocation {
            Invocation::Kind(k, _) => k.path,
            Invocation::Builtin(b) => panic!("{args}: {b:?}"),
        }
    }

    #[test]
    fn the_command_line_is_well_formed() {
        command().debug_assert();
    }

    #[test]
    fn kinds_are_accepted_plural_and_singular() {
        assert_eq!(kind_of("policies list"), "policies");
        assert_eq!(kind_of("policy list"), "policies");
        assert_eq!(kind_of("service-account get x"), "service-accounts");
        assert_eq!(kind_of("sa get x"), "service-accounts");
        assert_eq!(kind_of("idp ls"), "identity-providers");
        for k in KINDS {
            assert_eq!(kind_of(&format!("{} list", k.singular)), k.path);
        }
    }

    #[test]
    fn unknown_kinds_and_verbs_are_usage_errors() {
        for args in [
            "widgets list",
            "policies frobnicate",
            "policies",
            "routes validate -d {}",
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args}");
        }
    }

    #[test]
    fn actions_belong_to_their_kinds() {
        assert!(matches!(
            parse("policy validate -d {}").unwrap().invocation,
            Invocation::Kind(_, KindCommand::Action(Action::Validate(_)))
        ));
        assert!(matches!(
            parse("join-token rotate-token edge").unwrap().invocation,
            Invocation::Kind(_, KindCommand::Action(Action::RotateToken { .. }))
        ));
        assert!(parse("group rotate-token x").is_err());
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        let p = parse("--endpoint http://a:1 policies list --token t -o json").unwrap();
        assert_eq!(p.global.endpoint.as_deref(), Some("http://a:1"));
        assert_eq!(p.global.token.as_deref(), Some("t"));
        assert_eq!(p.global.output, Some(Output::Json));
        let p = parse("config set --endpoint http://b:2").unwrap();
        assert_eq!(p.global.endpoint.as_deref(), Some("http://b:2"));
        assert!(matches!(
            p.invocation,
            Invocation::Builtin(Builtin::Config(ConfigCommand::Set))
        ));
        let p = parse("fleet --output table").unwrap();
        assert_eq!(p.global.output, Some(Output::Table));
    }

    #[test]
    fn create_needs_exactly_one_input() {
        assert!(parse("policy create").is_err());
        assert!(parse("policy create -f a.json -d {}").is_err());
        assert!(parse("policy create -f a.json").is_ok());
        assert!(parse("policy create --data {}").is_ok());
    }

    #[test]
    fn update_takes_force_or_if_match_not_both() {
        assert!(parse("policy update p -d {} --force --if-match 3").is_err());
        match parse("policy update p -d {} --merge --if-match 3")
            .unwrap()
            .invocation
        {
            Invocation::Kind(_, KindCommand::Verb(Verb::Update(u))) => {
                assert!(u.merge && !u.force);
                assert_eq!(u.if_match.as_deref(), Some("3"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn filters_are_field_equals_value() {
        match parse("users list --filter status=suspended --filter email=a=b")
            .unwrap()
            .invocation
        {
            Invocation::Kind(_, KindCommand::Verb(Verb::List(l))) => assert_eq!(
                l.filter,
                vec![
                    ("status".to_owned(), "suspended".to_owned()),
                    ("email".to_owned(), "a=b".to_owned())
                ]
            ),
            other => panic!("{other:?}"),
        }
        assert!(parse("users list --filter status").is_err());
    }
}
