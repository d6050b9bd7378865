# services.platformx.beacon: Beacon under systemd, with the settings of systemd/beacon.service.
# Every key of beacon.toml goes under `settings` (README.md, crates/beacon/src/config.rs); the
# TLS key and the repository token are given as paths under `credentials` and reach Beacon
# through LoadCredential=. `acme` renders the `[acme]` section (certificates for the apps from
# an ACME CA) only when its directory URL is set.
self:
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.platformx.beacon;
  common = import ./common.nix { inherit lib pkgs; };
  credentials = common.credentialsDir "beacon";
in
{
  options.services.platformx.beacon = {
    enable = lib.mkEnableOption "Platform.X Beacon, the control plane";

    package = lib.mkOption {
      type = lib.types.package;
      default = self.packages.${pkgs.stdenv.hostPlatform.system}.beacon;
      defaultText = lib.literalExpression "platformx.packages.\${system}.beacon";
      description = "The package whose bin/beacon runs.";
    };

    settings = lib.mkOption {
      default = { };
      description = ''
        beacon.toml, rendered from this attribute set: any key Beacon knows (unknown keys make
        it refuse to start). It lands in the world-readable Nix store, so secrets never go
        here; their paths go in `credentials`.
      '';
      example = lib.literalExpression ''
        {
          http_listen = "0.0.0.0:7080";
          control_listen = "0.0.0.0:7443";
          tls_cert_file = "/etc/platformx/beacon.pem";
          tokens_file = "/etc/platformx/beacon-tokens.toml";
          domain = "example.com";
          repository = { url = "https://apprepo.internal:7070"; ca_file = "/etc/platformx/ca.pem"; };
          alerts.webhooks = [ "https://hooks.example.com/platformx" ];
        }
      '';
      type = lib.types.submodule {
        freeformType = common.settingsFormat.type;
        options = {
          http_listen = lib.mkOption {
            type = lib.types.str;
            default = "127.0.0.1:7080";
            description = "Address of the API and status page.";
          };
          control_listen = lib.mkOption {
            type = lib.types.str;
            default = "127.0.0.1:7443";
            description = "Address of the TLS control links from the Maestros and apprepo.";
          };
          data_dir = lib.mkOption {
            type = lib.types.str;
            default = "/var/lib/platformx/beacon";
            readOnly = true;
            description = "The event log and the assignment generation: the unit's StateDirectory=.";
          };
          tls_cert_file = lib.mkOption {
            type = lib.types.str;
            description = "Beacon's certificate chain (PEM), signed by the cluster CA; public, so it may be in the store.";
          };
          tokens_file = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = null;
            description = "A TOML file of `[[token]]` entries (roles read, deploy, maestro, repository): hashes only; each maestro entry names its `node`.";
          };
          domain = lib.mkOption {
            type = lib.types.str;
            default = cfg.domain;
            defaultText = lib.literalExpression "config.services.platformx.beacon.domain";
            description = "Apps without domains of their own are served as <app>.<domain>; set `domain` above.";
          };
          repository = lib.mkOption {
            default = { };
            description = "`[repository]`: where the desired state comes from.";
            type = lib.types.submodule {
              freeformType = common.settingsFormat.type;
              options.url = lib.mkOption {
                type = lib.types.str;
                default = "https://127.0.0.1:7070";
                description = "apprepo's base URL (HTTPS) as Beacon and the Maestros reach it; `ca_file` names the CA that signed apprepo's certificate.";
              };
            };
          };
        };
      };
    };

    domain = lib.mkOption {
      type = lib.types.strMatching "[a-z0-9]([a-z0-9.-]{0,187}[a-z0-9])?";
      default = "localhost";
      example = "apps.example.com";
      description = ''
        The cluster's domain: apps without domains of their own are served as <app>.<domain>
        (sets `settings.domain`). Point a wildcard DNS record for it at the web servers. At most
        189 characters, so <app>.<domain> fits DNS's 253; "localhost" only suits one machine.
      '';
    };

    acme = {
      directoryUrl = lib.mkOption {
        type = lib.types.nullOr (lib.types.strMatching "https://[^/?# ]+.*");
        default = null;
        example = "https://acme-v02.api.letsencrypt.org/directory";
        description = ''
          Directory URL of the ACME CA Beacon orders the apps' certificates from: Let's Encrypt
          production is https://acme-v02.api.letsencrypt.org/directory, its staging (untrusted
          certificates, for trying things out) https://acme-staging-v02.api.letsencrypt.org/directory.
          Set, it renders `settings.acme` (`[acme]` in beacon.toml); null (the default): no ACME.
          The web servers then need HTTPS on (services.platformx.maestro.https.enable).
        '';
      };
      email = lib.mkOption {
        type = lib.types.nullOr (lib.types.strMatching "[^@ ]+@[^@ ]+[.][^@ ]+");
        default = null;
        example = "ops@example.com";
        description = "The ACME account's contact address (`[acme] email`); null: none.";
      };
      caFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "/etc/platformx/acme-ca.pem";
        description = ''
          A CA bundle (PEM) that signs the ACME server's own certificate, for a private ACME
          server (Pebble, step-ca) (`[acme] ca_file`); null: the system's trust store. Public
          material: it may be in the store.
        '';
      };
    };

    credentials = {
      tlsKey = common.secretPath "Beacon's TLS private key (PEM).";
      repositoryToken = common.secretPath "Beacon's `read` token for apprepo.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the ports of `settings.http_listen` and `settings.control_listen` in the firewall.";
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      (common.user "beacon" "Platform.X Beacon")
      {
        assertions = [
          {
            assertion = cfg.credentials.tlsKey != null || cfg.settings ? tls_key_file;
            message = "services.platformx.beacon: set credentials.tlsKey (Beacon's TLS key)";
          }
          {
            assertion = cfg.credentials.repositoryToken != null || cfg.settings.repository ? token_file;
            message = "services.platformx.beacon: set credentials.repositoryToken (a read token for apprepo)";
          }
        ];

        services.platformx.beacon.settings = lib.mkMerge [
          (lib.mkIf (cfg.credentials.tlsKey != null) { tls_key_file = "${credentials}/tls-key"; })
          (lib.mkIf (cfg.credentials.repositoryToken != null) {
            repository.token_file = "${credentials}/repo-token";
          })
          # Only with a directory URL: a Beacon without ACME support refuses an unknown section.
          (lib.mkIf (cfg.acme.directoryUrl != null) {
            acme = {
              directory_url = cfg.acme.directoryUrl;
            }
            // lib.optionalAttrs (cfg.acme.email != null) { inherit (cfg.acme) email; }
            // lib.optionalAttrs (cfg.acme.caFile != null) { ca_file = cfg.acme.caFile; };
          })
        ];

        systemd.services.beacon = {
          description = "Platform.X Beacon (control plane)";
          wantedBy = [ "multi-user.target" ];
          wants = [ "network-online.target" ];
          after = [ "network-online.target" ];
          # One malloc arena, as systemd/beacon.service sets it: 20 MiB less for 10,000 links.
          environment.MALLOC_ARENA_MAX = "1";
          serviceConfig =
            common.serviceConfig {
              name = "beacon";
              inherit (cfg) package;
              configFile = common.configFile "beacon" cfg.settings;
              # HTTP requests and control links drain for up to 10 s (DRAIN_DEADLINE).
              stopTimeout = "30s";
              credentials = {
                tls-key = cfg.credentials.tlsKey;
                repo-token = cfg.credentials.repositoryToken;
              };
            }
            // import ./hardening.nix
            // {
              # One descriptor per control link, API client and event-stream follower.
              LimitNOFILE = 65536;
              ProcSubset = "pid";
              MemoryDenyWriteExecute = true;
              SystemCallFilter = [
                "@system-service"
                "~@privileged @resources"
              ];
            };
        };

        networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [
          (common.port cfg.settings.http_listen)
          (common.port cfg.settings.control_listen)
        ];
      }
    ]
  );
}
