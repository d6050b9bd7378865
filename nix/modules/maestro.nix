# services.platformx.maestro: Maestro under systemd, with the settings of systemd/maestro.service
# and its sockets: systemd binds the proxy's ports (maestro-http.socket, and maestro-https.socket
# with HTTPS) and passes them by name, so Maestro needs no capability and new connections wait
# in the socket's queue while Maestro restarts. Every key of maestro.toml goes under `settings`
# (README.md, crates/maestro/src/config.rs); the tokens are given as paths under `credentials`.
#
# Builds (docs/src/design/builds.md): `build.enable` makes this node one that builds, with
# `[build] enabled`, the `build = "true"` label Beacon places builds by, a `build` token for
# apprepo, bubblewrap on the unit's PATH and a sandbox that lets it start, and the pinned uv
# (nix/uv.nix). `build.runtimes` are the runtimes builds copy into releases, linked into
# `settings.build.runtimes_dir` as <name>/<version>.
#
# What a Nix runtime means in a release. The builder copies the interpreter's own files into the
# release (`.px/runtime`), so that web servers need no interpreter of their own. A Nix
# interpreter's files are not self-contained: its ELF loader, the libraries its RUNPATH names
# (OpenSSL, SQLite, zlib, libffi, ...) and npm's patched shebang are other paths of the Nix
# store. They cannot be made relative (an ELF loader path is absolute), and bundling glibc
# would need its own loader to run each program. So a release built here runs wherever the
# runtime's closure is in the store, and this module puts it there: `build.runtimes` is set
# alike on every Maestro of the cluster, builder or not (a module they all import, evaluated
# from the same nixpkgs), and on every one of them the runtimes directory links the packages,
# which keeps their closures in the system and safe from garbage collection. What that asks of
# the cluster: every web server is NixOS with the same `build.runtimes` (a Debian web server
# cannot run a release a NixOS builder made, nor the other way round); update web servers
# before the builders, so no release names a store path a web server lacks; and keep system
# generations as long as a release built with an older runtime may be rolled back to. The
# builder runs every copy from its place in the release before it packs it, so a broken runtime
# fails the build; a web server lacking the closure cannot start the release's instances, so
# its rollout stops there and the serving release keeps serving.
self:
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.platformx.maestro;
  common = import ./common.nix { inherit lib pkgs; };
  credentials = common.credentialsDir "maestro";
  builds = cfg.build.enable;
  # Every app process runs in bubblewrap ([sandbox] mode, docs/src/design/trust.md) unless
  # the settings say "none", and so does every build command on a node that builds.
  appSandbox = lib.attrByPath [ "sandbox" "mode" ] "bubblewrap" cfg.settings == "bubblewrap";
  bubblewrap = appSandbox || (builds && cfg.settings.build.sandbox == "bubblewrap");
  # The pinned uv as the builder's tools directory.
  uvTools = import ../uv.nix { inherit pkgs; };

  # Each of `build.runtimes` with its place in the runtimes directory, `<name>/<version>`: the
  # name is the one the builder looks for (python3 or node), from the package's pname (CPython's
  # is python3, Node.js's nodejs); the version is the package's own, which must be dotted
  # numbers (the builder skips other directory names).
  runtimeNames = {
    python3 = "python3";
    nodejs = "node";
  };
  runtimes = map (
    pkg:
    let
      pname = pkg.pname or (lib.getName pkg);
      version = pkg.version or (lib.getVersion pkg);
      name = runtimeNames.${pname} or null;
    in
    {
      inherit pkg version name;
      label = pkg.name or pname;
      valid = name != null && builtins.match "[0-9]+(\\.[0-9]+)*" version != null;
      entry = "${toString name}/${version}";
    }
  ) cfg.build.runtimes;
  invalidRuntimes = lib.filter (r: !r.valid) runtimes;
  entries = map (r: r.entry) (lib.filter (r: r.valid) runtimes);
  duplicateEntries = lib.unique (lib.filter (e: lib.count (x: x == e) entries > 1) entries);
  runtimesDir = pkgs.linkFarm "platformx-runtimes" (
    map (r: {
      name = r.entry;
      path = r.pkg;
    }) (lib.filter (r: r.valid) runtimes)
  );
  # The directories above the runtimes directory (`/opt`, `/opt/platformx`), made when missing.
  ancestors =
    path:
    let
      parts = lib.filter (p: p != "") (lib.splitString "/" path);
    in
    map (n: "/" + lib.concatStringsSep "/" (lib.take n parts)) (lib.range 1 (lib.length parts - 1));

  # `[build]` settings that Maestro defaults itself when left null (crates/maestro/src/config.rs).
  nullOption =
    type: description:
    lib.mkOption {
      type = lib.types.nullOr type;
      default = null;
      inherit description;
    };
  socket = name: port: {
    description = "Platform.X Maestro ${lib.toUpper name} socket (port ${toString port})";
    wantedBy = [ "sockets.target" ];
    socketConfig = {
      ListenStream = port;
      # Maestro takes each socket by this name (`http`, `https`).
      FileDescriptorName = name;
      Service = "maestro.service";
      # Connections queued while Maestro restarts; the kernel caps it at net.core.somaxconn.
      Backlog = 4096;
      # Accepted connections inherit TCP_NODELAY: small proxied writes must not wait on Nagle.
      NoDelay = true;
    };
  };
in
{
  options.services.platformx.maestro = {
    enable = lib.mkEnableOption "Platform.X Maestro, which runs the apps of this web server and proxies HTTP to them";

    package = lib.mkOption {
      type = lib.types.package;
      default = self.packages.${pkgs.stdenv.hostPlatform.system}.maestro;
      defaultText = lib.literalExpression "platformx.packages.\${system}.maestro";
      description = "The package whose bin/maestro runs.";
    };

    runtimes = lib.mkOption {
      type = lib.types.listOf lib.types.package;
      default = [ pkgs.python3 ];
      defaultText = lib.literalExpression "[ pkgs.python3 ]";
      example = lib.literalExpression "[ pkgs.python3 pkgs.nodejs_22 pkgs.ffmpeg ]";
      description = ''
        Packages on the apps' PATH (after each release's own bin/, and after the runtime a
        built release carries): the runtimes Maestro reports to Beacon and checks an app's
        `runtime` and `requires` against, for apps that are not built.
      '';
    };

    build = {
      enable = lib.mkEnableOption ''
        builds on this node: `[build] enabled`, the `build = "true"` label Beacon sends builds
        by, a `build` token for apprepo (`credentials.buildToken`), bubblewrap, and a unit
        sandbox that lets it start. The unit then also allows user, mount, PID, IPC, UTS and
        cgroup namespaces and the mount system calls, which bubblewrap needs and the apps of
        this node get as well: where that matters, let builds have nodes of their own
      '';

      runtimes = lib.mkOption {
        type = lib.types.listOf lib.types.package;
        default = [ ];
        example = lib.literalExpression "[ pkgs.python312 pkgs.python311 pkgs.nodejs_22 ]";
        description = ''
          The runtimes builds copy into releases: CPython 3 (pname `python3`, e.g.
          `pkgs.python312`) and Node.js with npm (pname `nodejs`, e.g. `pkgs.nodejs_22`),
          linked into `settings.build.runtimes_dir` as `python3/<version>` and
          `node/<version>` (the package's own version, e.g. `python3/3.12.8`). An app gets the
          newest one its request admits (`.python-version`, `engines.node`, ...).

          Set the same list on every Maestro of the cluster, builder or not, from the same
          nixpkgs: a release built with a Nix runtime needs that runtime's closure in the
          store of each web server that runs it, and this option keeps it there (the header
          of nix/modules/maestro.nix says why). Leave it empty to fill the runtimes directory
          some other way.
        '';
      };

      packages = lib.mkOption {
        type = lib.types.listOf lib.types.package;
        default = [ ];
        example = lib.literalExpression "[ pkgs.gnumake pkgs.gcc pkgs.git ]";
        description = ''
          More programs on the PATH of build commands (a `[build] command`'s tools, a compiler
          for a package without a wheel). The builds' sandbox shows the Nix store, and passes
          on the unit's PATH entries in it; the apps of this node see them too.
        '';
      };
    };

    httpPort = lib.mkOption {
      type = lib.types.port;
      default = 80;
      description = "The port maestro-http.socket listens on (replaces `settings.http_listen`).";
    };

    https = {
      enable = lib.mkEnableOption "HTTPS on maestro-https.socket: the certificates Beacon's ACME issues, and those of `settings.certs_dir` (<domain>.crt and .key) when set";
      port = lib.mkOption {
        type = lib.types.port;
        default = 443;
        description = "The port maestro-https.socket listens on.";
      };
    };

    settings = lib.mkOption {
      default = { };
      description = ''
        maestro.toml, rendered from this attribute set: any key Maestro knows (unknown keys make
        it refuse to start). It lands in the world-readable Nix store, so secrets never go
        here; their paths go in `credentials`.
      '';
      example = lib.literalExpression ''
        {
          node_name = "web-1";
          labels.role = "web";
          beacon = { addr = "control.internal:7443"; ca_file = "/etc/platformx/ca.pem"; };
        }
      '';
      type = lib.types.submodule {
        freeformType = common.settingsFormat.type;
        options = {
          node_name = lib.mkOption {
            type = lib.types.str;
            default = config.networking.hostName;
            defaultText = lib.literalExpression "config.networking.hostName";
            description = "This node's name on the control link and the status page.";
          };
          status_listen = lib.mkOption {
            type = lib.types.str;
            default = "127.0.0.1:7090";
            description = "Local /healthz, /metrics and /v1/state.";
          };
          state_dir = lib.mkOption {
            type = lib.types.str;
            default = "/var/lib/platformx/maestro";
            readOnly = true;
            description = "Releases and the persisted assignment: the unit's StateDirectory=.";
          };
          log_dir = lib.mkOption {
            type = lib.types.str;
            default = "/var/log/platformx";
            readOnly = true;
            description = "The apps' logs and the access log: the unit's LogsDirectory=.";
          };
          build = lib.mkOption {
            default = { };
            description = ''
              `[build]`: how this node builds (docs/src/reference/builds.md). Settings left
              null keep Maestro's defaults.
            '';
            type = lib.types.submodule {
              options = {
                enabled = lib.mkOption {
                  type = lib.types.bool;
                  default = cfg.build.enable;
                  defaultText = lib.literalExpression "config.services.platformx.maestro.build.enable";
                  readOnly = true;
                  description = "Run the builds Beacon sends here: set `build.enable`, which also prepares the unit.";
                };
                runtimes_dir = lib.mkOption {
                  type = lib.types.str;
                  default = "/opt/platformx/runtimes";
                  description = ''
                    The runtimes directory (`<name>/<version>/` with `bin/python3` or
                    `bin/node`). With `build.runtimes`, a link to them made at boot and at
                    each switch (systemd-tmpfiles), replacing whatever is there.
                  '';
                };
                discover_host_runtimes = lib.mkOption {
                  type = lib.types.bool;
                  default = false;
                  description = "Also use the interpreters on the unit's PATH (`em up` does); on a cluster, keep runtimes in `build.runtimes`.";
                };
                tools_dir = lib.mkOption {
                  type = lib.types.nullOr lib.types.str;
                  default = if builds then "${uvTools}" else null;
                  defaultText = lib.literalExpression "the pinned uv of nix/uv.nix when build.enable";
                  description = ''
                    Where the builder finds its pinned uv (`uv-<version>/bin/uv`). A directory
                    without it makes the builder install it with the runtime's `python3 -m
                    pip`, which a Nix Python lacks: keep the default.
                  '';
                };
                cache_dir = nullOption lib.types.str ''
                  The builder's caches (installers' caches, dependency trees, runtime layers).
                  Default (null): `<state_dir>/build-cache`. Another path is made writable for
                  the unit.
                '';
                sandbox = lib.mkOption {
                  type = lib.types.enum [
                    "bubblewrap"
                    "none"
                  ];
                  default = "bubblewrap";
                  description = ''
                    `bubblewrap` isolates every build command (an unprivileged user in a user
                    namespace, nothing of the node's secrets visible); `none` keeps only the
                    limits, and a build can then read this node's tokens.
                  '';
                };
                time_limit = nullOption lib.types.str "Wall time of one build. Default (null): 15m.";
                memory_limit = nullOption lib.types.str "Memory of each build command. Default (null): 2GiB.";
                disk_limit = nullOption lib.types.str "What a build may add to its directory and its app's cache. Default (null): 4GiB.";
                process_limit = nullOption lib.types.ints.positive "Processes and threads of a build at once. Default (null): 512.";
                output_limit = nullOption lib.types.str "Output of a build's commands. Default (null): 4MiB.";
                ca_file = nullOption lib.types.str ''
                  A CA bundle the installers trust besides the system's (an inspecting proxy, a
                  private registry). A CA in `security.pki.certificateFiles` needs none: builds
                  see the system's bundle.
                '';
                python_index = nullOption lib.types.str "The Python package index (`https://...`). Default (null): PyPI.";
                npm_registry = nullOption lib.types.str "The npm registry (`https://...`). Default (null): npm's own.";
              };
            };
          };
        };
      };
    };

    credentials = {
      linkToken = common.secretPath "This node's `maestro` token for its link to Beacon (`settings.beacon`).";
      repositoryToken = common.secretPath "A `release` token for apprepo, to download bundles and run release phases (a node that builds takes `buildToken` instead).";
      buildToken = common.secretPath "A `build` token for apprepo, on a node with `build.enable`: it downloads bundles as a `read` token does, and uploads the layers of builds and finishes them.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the HTTP (and HTTPS) port in the firewall.";
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      (common.user "maestro" "Platform.X Maestro and its apps")
      {
        assertions = [
          {
            assertion = cfg.settings ? beacon -> cfg.settings.beacon ? token_file;
            message = "services.platformx.maestro: settings.beacon needs credentials.linkToken";
          }
          {
            assertion = builds -> cfg.credentials.buildToken != null;
            message = "services.platformx.maestro: build.enable needs credentials.buildToken (a `build` token for apprepo)";
          }
          {
            assertion = cfg.credentials.buildToken != null -> builds && cfg.credentials.repositoryToken == null;
            message = "services.platformx.maestro: credentials.buildToken is for a node with build.enable, in place of credentials.repositoryToken";
          }
          {
            assertion = bubblewrap -> config.security.allowUserNamespaces;
            message = "services.platformx.maestro: app processes and builds in bubblewrap need user namespaces (security.allowUserNamespaces), or settings.sandbox.mode = \"none\" and settings.build.sandbox = \"none\"";
          }
        ]
        ++ map (r: {
          assertion = false;
          message = "services.platformx.maestro: build.runtimes: ${r.label} is not a runtime the builder copies: a CPython 3 (pname python3, e.g. pkgs.python312) or Node.js with npm (pname nodejs, e.g. pkgs.nodejs_22), whose version is dotted numbers (it has ${r.version})";
        }) invalidRuntimes
        ++ map (entry: {
          assertion = false;
          message = "services.platformx.maestro: build.runtimes holds ${entry} more than once";
        }) duplicateEntries;

        warnings = lib.optional (
          builds && cfg.build.runtimes == [ ] && !cfg.settings.build.discover_host_runtimes
        ) "services.platformx.maestro: build.enable without build.runtimes: builds of apps that need a Python or Node runtime will fail unless ${cfg.settings.build.runtimes_dir} is filled some other way";

        services.platformx.maestro.settings = lib.mkMerge [
          (lib.mkIf (cfg.credentials.linkToken != null) {
            beacon.token_file = "${credentials}/link-token";
          })
          (lib.mkIf (cfg.credentials.repositoryToken != null || cfg.credentials.buildToken != null) {
            repository_token_file = "${credentials}/repo-token";
          })
          # Beacon sends builds only to Maestros with this label (px_proto::build::BUILD_LABEL).
          (lib.mkIf builds { labels.build = "true"; })
        ];

        # The runtimes directory links the runtimes, on every node that has them (see
        # build.runtimes): the link is what keeps their closures in this system.
        systemd.tmpfiles.rules = lib.mkIf (cfg.build.runtimes != [ ]) (
          map (dir: "d ${dir} - - - -") (ancestors cfg.settings.build.runtimes_dir)
          ++ [ "L+ ${cfg.settings.build.runtimes_dir} - - - - ${runtimesDir}" ]
        );
        # Each build's sandbox starts in a user namespace made by an unprivileged user, which
        # kernels with this switch (linux_hardened, under the hardened profile) refuse unless
        # it is on; elsewhere the switch does nothing.
        security.unprivilegedUsernsClone = lib.mkIf bubblewrap true;

        systemd.sockets = {
          maestro-http = socket "http" cfg.httpPort;
        }
        // lib.optionalAttrs cfg.https.enable { maestro-https = socket "https" cfg.https.port; };

        systemd.services.maestro = {
          description = "Platform.X Maestro (app instances and HTTP proxy)";
          wantedBy = [ "multi-user.target" ];
          wants = [ "network-online.target" ];
          after = [
            "network-online.target"
            "maestro-http.socket"
          ]
          ++ lib.optional cfg.https.enable "maestro-https.socket";
          # The apps' PATH, after each release's bin/: util-linux on every node (`em run`
          # starts a command under a terminal with its `setsid --ctty`; builds use its prlimit
          # and setpriv); a node that builds adds bubblewrap and the build commands' programs,
          # whose store paths the builds' sandbox passes on.
          path =
            cfg.runtimes
            ++ [ pkgs.util-linux ]
            ++ lib.optional bubblewrap pkgs.bubblewrap
            ++ lib.optionals builds cfg.build.packages;
          # Each app instance in a cgroup of its own with its [limits] (see Delegate= below).
          environment.PX_MAESTRO_CGROUP_LIMITS = "true";
          serviceConfig =
            common.serviceConfig {
              name = "maestro";
              inherit (cfg) package;
              configFile = common.configFile "maestro" cfg.settings;
              # drain_deadline (30 s), then stop_grace (10 s) for the apps, plus margin.
              stopTimeout = "60s";
              credentials = {
                link-token = cfg.credentials.linkToken;
                repo-token = if builds then cfg.credentials.buildToken else cfg.credentials.repositoryToken;
              };
            }
            // import ./hardening.nix
            // {
              # SIGTERM to Maestro alone, which drains and stops its apps itself; whatever is
              # left when it exits gets SIGKILL, so no app outlives it.
              KillMode = "mixed";
              # Maestro manages its own cgroup: a leaf for itself, one cgroup per app instance
              # with memory.max, pids.max and cpu.weight; so the hierarchy cannot be read-only.
              Delegate = true;
              ProtectControlGroups = false;
              # One descriptor per proxied and per upstream connection.
              LimitNOFILE = 65536;
              # Only Maestro writes log files: the apps' output and the access log.
              LogsDirectory = "platformx";
              LogsDirectoryMode = "0700";
              # Taking the sockets systemd passed duplicates them with pidfd_getfd, which
              # @system-service leaves out. No MemoryDenyWriteExecute=: the apps' interpreters
              # (V8's JIT, Python's ctypes) share this sandbox and need it.
              SystemCallFilter = [
                "@system-service"
                "~@privileged"
                "pidfd_getfd"
              ]
              # bubblewrap builds its sandbox with mount, umount2 and pivot_root (@mount), and
              # drops its capabilities in there with capset; ~@privileged takes both away.
              # Without them it exits at once ("Failed to make / slave", "capset failed").
              # `setpriv` (and bubblewrap inside its namespaces) sets its user and groups
              # (@setuid), and Maestro gives each app its data directory, `apps/<app>` and,
              # for a build, its build tree (@chown), as in systemd/maestro.service.
              ++ lib.optionals bubblewrap [
                "@mount"
                "capset"
                "@setuid"
                "@chown"
              ];
            }
            // lib.optionalAttrs bubblewrap {
              # Each app process, and each build command, runs as a uid of its own outside its
              # sandbox too (`state_dir/app-uids.json`, docs/src/design/trust.md), as under
              # systemd/maestro.service: Maestro holds these four capabilities, and no others,
              # as ambient ones, so that they reach the `setpriv` that takes the app's uid and
              # empties every capability set before bubblewrap; every other program Maestro
              # starts drops them (px_runtime::caps). CAP_SETUID and CAP_SETGID switch users,
              # CAP_CHOWN gives an app its data directory and a build its tree (and takes the
              # tree back), CAP_KILL stops processes of other uids.
              AmbientCapabilities = "CAP_SETUID CAP_SETGID CAP_CHOWN CAP_KILL";
              CapabilityBoundingSet = "CAP_SETUID CAP_SETGID CAP_CHOWN CAP_KILL";
              # Traversable by the apps' uids (nothing listed, nothing read: what Maestro keeps
              # there is 0600/0700 under UMask=0077), which reach their own release and data
              # directory by name.
              StateDirectoryMode = "0711";
              # Not "invisible": the app processes are other users now, which Maestro follows
              # through /proc. Inside its sandbox an app's /proc shows its own PID namespace.
              ProtectProc = "default";
              # The kernel lets a user namespace mount a new /proc only while every /proc mount
              # it can see is fully visible; these two cover parts of /proc, so they stay off,
              # as in systemd/maestro.service.
              ProtectKernelTunables = false;
              ProtectKernelLogs = false;
            }
            // lib.optionalAttrs bubblewrap {
              # Each app process and build command starts in new user, mount, PID, IPC, UTS
              # and cgroup namespaces (crates/runtime/src/sandbox.rs); the network one stays
              # the node's, as apps listen on loopback ports and installers need the
              # registries. The kernel gives capabilities inside a new user namespace whatever
              # this unit's bounding set, so bubblewrap needs no privilege of this unit's.
              RestrictNamespaces = "user mnt pid ipc uts cgroup";
            }
            // lib.optionalAttrs (cfg.settings.build.cache_dir != null) {
              ReadWritePaths = [ cfg.settings.build.cache_dir ];
            };
        };

        networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall (
          [ cfg.httpPort ] ++ lib.optional cfg.https.enable cfg.https.port
        );
      }
    ]
  );
}
