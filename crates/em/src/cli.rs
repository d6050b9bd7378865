//! The command line of `em`: every command, its flags, help text and examples.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "em",
    version,
    about = "Enginemill: create, run and deploy web apps on Platform.X",
    long_about = "Enginemill (em) is the Platform.X developer tool.\n\n\
        Start the whole platform on this machine with `em up`, create an app with `em init`,\n\
        and ship it with `em deploy`. Against a cluster, `em login --remote URL` first.",
    after_help = "Examples:\n  em up                      # the platform on this machine\n  em init hello && cd hello  # a new app\n  em deploy                  # ship it; open http://hello.localhost:8080/\n  em logs -f                 # follow its output"
)]
pub struct Cli {
    /// Print machine-readable JSON instead of text (where it applies).
    #[arg(long, global = true)]
    pub json: bool,
    /// Allow http:// to other machines (the token then crosses the network in the clear).
    #[arg(long, global = true)]
    pub insecure: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the whole platform (apprepo, Beacon, Maestro) on this machine
    #[command(
        after_help = "Examples:\n  em up\n  em up --http-port 9090 --data-dir /tmp/px\n  em up --acme-directory https://acme-staging-v02.api.letsencrypt.org/directory --acme-email you@example.com\n  em up --acme-directory https://127.0.0.1:14000/dir --acme-ca-file pebble-ca.pem\n\nApps are served at http://<app>.localhost:<http-port>/. Ctrl-C stops everything,\napps included; the next `em up` brings the same apps and releases back.\n\nHTTPS: with an ACME directory (given once, remembered in the data directory), every\nname `em domains add` gives an app gets a certificate from that CA, served on\n--https-port over HTTP/2 and HTTP/1.1; plain HTTP to the name then redirects there.\nLet's Encrypt: https://acme-v02.api.letsencrypt.org/directory (production),\nhttps://acme-staging-v02.api.letsencrypt.org/directory (staging). Its checks come to\nport 80 (http-01) or 443 (tls-alpn-01) of the address the name points at."
    )]
    Up(UpArgs),
    /// Create a new app from a template, or write app.toml for an app that is already there
    #[command(
        after_help = "Examples:\n  em init hello\n  em init site --template static\n  em init api --name my-api --template node\n  cd my-django-app && em init   # app.toml for the app already there\n\nIn a directory that holds an app (a Procfile, requirements.txt, package.json, ...),\nem init writes only app.toml, saying what it found; it exits 6 when it cannot tell\nhow the app starts, with a `run` to fill in."
    )]
    Init {
        /// Directory of the app (default: the current one). A new or empty one gets a
        /// template; one that holds an app gets an app.toml for it.
        dir: Option<PathBuf>,
        /// App name (default: the directory's name); a lowercase DNS label.
        #[arg(long)]
        name: Option<String>,
        /// Template for a new app (default: python); only for a new or empty directory.
        #[arg(long, value_enum)]
        template: Option<Template>,
    },
    /// Run an app locally the way Maestro would, restarting it when files change
    #[command(after_help = "Examples:\n  em dev\n  em dev examples/python-hello --port 5000")]
    Dev {
        /// The app directory (default: the current one).
        dir: Option<PathBuf>,
        /// Port of the local proxy in front of the app.
        #[arg(long, default_value_t = 5000)]
        port: u16,
    },
    /// Pack, upload and roll out an app; waits until every node serves it
    #[command(
        after_help = "Examples:\n  em deploy\n  em deploy examples/python-hello\n  em deploy --app staging-hello --no-wait\n\nAn app that needs a build (a requirements.txt, a package.json, a [build] command) is\nbuilt on the platform first; its output is shown as it runs.\n\nExit status: 0 when every node serves the new release; 1 when the build or the rollout\nfailed (the build's last lines, or the failing node and the app's last stderr lines, are\nprinted); 7 when a newer deploy of the app superseded this one (it names it)."
    )]
    Deploy {
        /// The app directory (default: the current one).
        dir: Option<PathBuf>,
        /// App to deploy to (default: `name` in app.toml).
        #[arg(long)]
        app: Option<String>,
        /// Return once the release is committed, without waiting for the rollout.
        #[arg(long)]
        no_wait: bool,
        /// A note shown in `em releases`.
        #[arg(long, short)]
        message: Option<String>,
    },
    /// Nodes and apps as Beacon sees them
    Status,
    /// Apps in the repository
    Apps,
    /// Releases of an app, newest first
    #[command(
        after_help = "Examples:\n  em releases --app hello\n  em releases --build-log v7   # the output of the build that made v7"
    )]
    Releases {
        #[arg(long)]
        app: Option<String>,
        /// Print the log of the build that made this release (`7` or `v7`) instead.
        #[arg(long, value_name = "RELEASE")]
        build_log: Option<String>,
    },
    /// Roll an app back to an earlier release (as a new release)
    #[command(
        after_help = "Examples:\n  em rollback            # to the release before the current one\n  em rollback v3 --app hello"
    )]
    Rollback {
        /// Release to go back to (`7` or `v7`; default: the previous one).
        release: Option<String>,
        #[arg(long)]
        app: Option<String>,
    },
    /// Show or change an app's config vars (each change is a new release)
    #[command(
        after_help = "Examples:\n  em config\n  em config set DATABASE_URL=postgres://db/app MODE=prod\n  em config unset MODE"
    )]
    Config {
        #[arg(long, global = true)]
        app: Option<String>,
        #[command(subcommand)]
        change: Option<ConfigChange>,
    },
    /// Show an app's output from every node
    #[command(after_help = "Examples:\n  em logs\n  em logs -f --app hello\n  em logs --lines 500")]
    Logs {
        #[arg(long)]
        app: Option<String>,
        /// Keep following new lines.
        #[arg(long, short)]
        follow: bool,
        /// How many recent lines to show first.
        #[arg(long, default_value_t = 100)]
        lines: usize,
    },
    /// Point em at a cluster; the token is read from stdin or a file, never an argument
    #[command(
        after_help = "Examples:\n  em login --remote https://apprepo.example.com --beacon https://beacon.example.com < token\n  em login --remote https://apprepo.example.com --beacon https://control-1.example.com:7071 --beacon https://control-2.example.com:7071 < token\n  em login --remote https://10.0.0.5:7070 --ca-file cluster-ca.pem --token-file ~/px-token\n\nem refuses http:// to another machine (the token would cross the network in the clear)\nunless given --insecure, which it then remembers for this remote."
    )]
    Login {
        /// apprepo's URL.
        #[arg(long)]
        remote: String,
        /// Beacon's API URL (default: the remote's host, port 7071); once for each Beacon when
        /// the cluster runs several (em follows the active one).
        #[arg(long)]
        beacon: Vec<String>,
        /// Read the token from this file instead of stdin.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// PEM file of the cluster's CA, trusted instead of the public roots (Ansible installs
        /// it as /etc/platformx/ca.pem on every host).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Print shell completions
    #[command(
        after_help = "Examples:\n  em completions bash > /etc/bash_completion.d/em\n  em completions zsh > \"${fpath[1]}/_em\""
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Run a one-off command of the app's current release on a node that runs it
    #[command(
        after_help = "Examples:\n  em run -- python manage.py shell\n  em run --app hello -- sh -c 'echo $DATABASE_URL'\n  em run --detach -- python manage.py clearsessions\n\nThe command gets the app's config and runs as its instances do. With a terminal, it\ngets one too (Ctrl-C and the window size reach it); em exits with its exit code.\nWith --detach its output goes to the app's logs as run.N (`em logs -f`)."
    )]
    Run {
        #[arg(long)]
        app: Option<String>,
        /// Start it and return; its output goes to the app's logs.
        #[arg(long)]
        detach: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Show or change how many processes of each type an app runs (no new release)
    #[command(
        after_help = "Examples:\n  em scale                      # the formation\n  em scale web=2 worker=3\n  em scale worker=0 --app shop  # stop the workers\n\n`web` counts per web server; every other type counts in total across the cluster.\nTypes not given keep their count. Scaling restarts nothing that keeps running.\nExit status 5 when the platform refuses a count (an unknown type, over a limit)."
    )]
    Scale {
        #[arg(long)]
        app: Option<String>,
        /// Counts to set: TYPE=COUNT …
        #[arg(value_name = "TYPE=COUNT")]
        pairs: Vec<String>,
    },
    /// List an app's processes on every node, with their state, memory and CPU
    #[command(after_help = "Examples:\n  em ps\n  em ps --app shop --json")]
    Ps {
        #[arg(long)]
        app: Option<String>,
    },
    /// Add, remove and list the host names an app is served on (no new release)
    #[command(
        after_help = "Examples:\n  em domains list\n  em domains add shop.example.com\n  em domains remove shop.example.com --app shop\n\nAn added name is served within seconds, with no deploy and no restart; point its DNS\nat the web servers. A name another app holds is refused, naming that app (exit 5).\nNames in app.toml's [http] domains change with a deploy; `list` shows where each\nname comes from: manifest, added, or cluster (<app>.<cluster domain>)."
    )]
    Domains {
        #[command(subcommand)]
        action: DomainsAction,
    },
    /// Mint, list and revoke tokens limited to some apps (for CI pipelines)
    #[command(
        after_help = "Examples:\n  em tokens create ci-shop --apps shop\n  em tokens create dash --apps shop,blog --role read --expires 7d\n  em tokens list\n  em tokens revoke ci-shop\n\nA token is shown once, when it is made; apprepo keeps only its hash. It works on\napprepo and Beacon, for its apps only, until it expires (30 days unless --expires says,\nat most 365) or is revoked. You can mint only within your own token's role and apps."
    )]
    Tokens {
        #[command(subcommand)]
        action: TokensAction,
    },
}

/// `em up`'s flags.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Where the platform keeps its state (default: $XDG_DATA_HOME/platformx).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Port of the proxy that serves the apps.
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// Port of the HTTPS proxy (HTTP/2 and HTTP/1.1) [default: 8443]; on only with ACME,
    /// whose certificates it serves.
    #[arg(long)]
    pub https_port: Option<u16>,
    /// First of four ports for the platform's own services (apprepo, Beacon API, Beacon
    /// links, Maestro status).
    #[arg(long, default_value_t = 7070)]
    pub port_base: u16,
    /// URL that receives a JSON POST for every alert (a crash loop, a failed deploy, an
    /// app's error event); repeat for several.
    #[arg(long = "webhook", value_name = "URL")]
    pub webhooks: Vec<String>,
    /// Run apps without their sandbox, as your own user: for a machine where bubblewrap
    /// misbehaves, and to measure what the sandbox costs (benches/sandbox).
    #[arg(long)]
    pub no_sandbox: bool,
    /// The ACME CA's directory URL: certificates for every app's host names (Let's Encrypt's
    /// staging or production directory, or a private CA's). Remembered, with the other
    /// --acme-* flags, until given again or --no-acme.
    #[arg(long, value_name = "URL")]
    pub acme_directory: Option<String>,
    /// Contact address given to the CA (expiry notices).
    #[arg(long, value_name = "EMAIL")]
    pub acme_email: Option<String>,
    /// PEM file of the CA that signed the ACME server's own certificate (a private CA such as
    /// Pebble's), trusted instead of the system's roots.
    #[arg(long, value_name = "PATH")]
    pub acme_ca_file: Option<PathBuf>,
    /// How the CA checks that this machine serves a name: a request to --http-port, or a TLS
    /// handshake on --https-port (ports 80 and 443 for a public CA) [default: http-01].
    #[arg(long, value_enum)]
    pub acme_challenge: Option<AcmeChallenge>,
    /// Forget the remembered ACME settings: no more certificates, and no HTTPS listener.
    #[arg(long, conflicts_with_all = ["acme_directory", "acme_email", "acme_ca_file", "acme_challenge", "https_port"])]
    pub no_acme: bool,
}

/// `--acme-challenge`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcmeChallenge {
    #[value(name = "http-01")]
    Http01,
    #[value(name = "tls-alpn-01")]
    TlsAlpn01,
}

#[derive(Subcommand, Debug)]
pub enum TokensAction {
    /// Mint a token: NAME --apps a,b [--role deploy|read] [--expires 30d]
    Create {
        name: String,
        /// The apps it may act on, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        apps: Vec<String>,
        #[arg(long, value_enum, default_value = "deploy")]
        role: TokenRole,
        /// How long it lives (30d, 12h); 30 days unless given.
        #[arg(long)]
        expires: Option<String>,
    },
    /// List the minted tokens you may see (never a secret)
    List,
    /// Revoke a minted token: refused at once by apprepo, by Beacon within seconds
    Revoke { name: String },
}

#[derive(Subcommand, Debug)]
pub enum DomainsAction {
    /// Serve the app on a host name too: NAME
    Add {
        #[arg(long)]
        app: Option<String>,
        /// The host name, such as shop.example.com.
        name: String,
    },
    /// Stop serving an added host name: NAME
    Remove {
        #[arg(long)]
        app: Option<String>,
        name: String,
    },
    /// List the app's host names with where each comes from
    List {
        #[arg(long)]
        app: Option<String>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRole {
    Deploy,
    Read,
}

#[derive(Subcommand, Debug)]
pub enum ConfigChange {
    /// Set vars: KEY=VALUE …
    Set {
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// Remove vars: KEY …
    Unset {
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Template {
    /// Python 3, standard library only.
    Python,
    /// Node.js, built-in `http` only.
    Node,
    /// A static site.
    Static,
}
