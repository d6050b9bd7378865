# services.platformx.maestro: Maestro under systemd, with the settings of systemd/maestro.service
# and its sockets: systemd binds the proxy's ports (maestro-http.socket, and maestro-https.socket
# with HTTPS) and passes them by name, so Maestro needs no capability and new connections wait
# in the socket's queue while Maestro restarts. Every key of maestro.toml goes under `settings`
# (README.md, crates/maestro/src/config.rs); the tokens are given as paths under `credentials`.
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
        Packages on the apps' PATH (after each release's own bin/): the runtimes Maestro
        reports to Beacon and checks an app's `runtime` and `requires` against.
      '';
    };

    httpPort = lib.mkOption {
      type = lib.types.port;
      default = 80;
      description = "The port maestro-http.socket listens on (replaces `settings.http_listen`).";
    };

    https = {
      enable = lib.mkEnableOption "HTTPS on maestro-https.socket, with `settings.certs_dir` (<domain>.crt and .key)";
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
        };
      };
    };

    credentials = {
      linkToken = common.secretPath "This node's `maestro` token for its link to Beacon (`settings.beacon`).";
      repositoryToken = common.secretPath "A `read` token for apprepo, to download bundles.";
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
            assertion = cfg.https.enable -> cfg.settings ? certs_dir;
            message = "services.platformx.maestro: https.enable needs settings.certs_dir";
          }
        ];

        services.platformx.maestro.settings = lib.mkMerge [
          (lib.mkIf (cfg.credentials.linkToken != null) {
            beacon.token_file = "${credentials}/link-token";
          })
          (lib.mkIf (cfg.credentials.repositoryToken != null) {
            repository_token_file = "${credentials}/repo-token";
          })
        ];

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
          # The apps' PATH, after each release's bin/.
          path = cfg.runtimes;
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
                repo-token = cfg.credentials.repositoryToken;
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
              ];
            };
        };

        networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall (
          [ cfg.httpPort ] ++ lib.optional cfg.https.enable cfg.https.port
        );
      }
    ]
  );
}
