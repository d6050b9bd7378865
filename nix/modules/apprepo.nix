# services.platformx.apprepo: apprepo under systemd, with the settings of systemd/apprepo.service.
# Every key of apprepo.toml goes under `settings` (README.md, crates/repository/src/config.rs);
# secrets are given as paths under `credentials` and reach apprepo through LoadCredential=.
self:
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.platformx.apprepo;
  common = import ./common.nix { inherit lib pkgs; };
  credentials = common.credentialsDir "apprepo";
in
{
  options.services.platformx.apprepo = {
    enable = lib.mkEnableOption "Platform.X apprepo, which receives app bundles and commits releases";

    package = lib.mkOption {
      type = lib.types.package;
      default = self.packages.${pkgs.stdenv.hostPlatform.system}.apprepo;
      defaultText = lib.literalExpression "platformx.packages.\${system}.apprepo";
      description = "The package whose bin/apprepo runs.";
    };

    settings = lib.mkOption {
      default = { };
      description = ''
        apprepo.toml, rendered from this attribute set: any key apprepo knows (unknown keys make
        it refuse to start). It lands in the world-readable Nix store, so secrets never go
        here; their paths go in `credentials`.
      '';
      example = lib.literalExpression ''
        {
          listen = "0.0.0.0:7070";
          tokens_file = "/etc/platformx/apprepo-tokens.toml";
          api_tls.cert_file = "/etc/platformx/apprepo-api.pem"; # key: credentials.apiTlsKey
          beacon = { addr = "control.internal:7443"; ca_file = "/etc/platformx/ca.pem"; };
        }
      '';
      type = lib.types.submodule {
        freeformType = common.settingsFormat.type;
        options = {
          listen = lib.mkOption {
            type = lib.types.str;
            default = "127.0.0.1:7070";
            description = "Address of the HTTPS API (uploads from em, downloads by the Maestros).";
          };
          data_dir = lib.mkOption {
            type = lib.types.str;
            default = "/var/lib/platformx/apprepo";
            readOnly = true;
            description = "Spool files and, with the fs backend, the bundles: the unit's StateDirectory=.";
          };
          tokens_file = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = null;
            description = ''
              A TOML file of `[[token]]` entries (`name`, `role`, `sha256`): hashes only, so it
              may be in the store. `apprepo token-new --name NAME --role deploy|read|build|release` prints a
              token and its entry.
            '';
          };
        };
      };
    };

    credentials = {
      linkToken = common.secretPath "apprepo's `repository` token for its link to Beacon (`settings.beacon`).";
      apiTlsKey = common.secretPath "The private key (PEM) of the API's certificate (`settings.api_tls.cert_file`): the API serves HTTPS. Without it, set `settings.api_tls.plain_http = true` (only behind a TLS proxy or on loopback).";
      s3SecretAccessKey = common.secretPath "The S3 secret access key, with `settings.storage.s3.access_key_id`.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the port of `settings.listen` in the firewall.";
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      (common.user "apprepo" "Platform.X apprepo")
      {
        assertions = [
          {
            assertion = cfg.settings ? beacon -> cfg.settings.beacon ? token_file;
            message = "services.platformx.apprepo: settings.beacon needs credentials.linkToken";
          }
          {
            assertion = cfg.credentials.linkToken != null -> cfg.settings.beacon ? addr;
            message = "services.platformx.apprepo: credentials.linkToken is for the link to Beacon: set settings.beacon.addr and ca_file";
          }
        ];

        services.platformx.apprepo.settings = lib.mkMerge [
          (lib.mkIf (cfg.credentials.linkToken != null) {
            beacon.token_file = "${credentials}/link-token";
          })
          (lib.mkIf (cfg.credentials.s3SecretAccessKey != null) {
            storage.s3.secret_access_key_file = "${credentials}/s3-secret";
          })
          (lib.mkIf (cfg.credentials.apiTlsKey != null) {
            api_tls.key_file = "${credentials}/api-tls-key";
          })
        ];

        systemd.services.apprepo = {
          description = "Platform.X apprepo (bundles and releases)";
          wantedBy = [ "multi-user.target" ];
          wants = [ "network-online.target" ];
          after = [ "network-online.target" ];
          serviceConfig =
            common.serviceConfig {
              name = "apprepo";
              inherit (cfg) package;
              configFile = common.configFile "apprepo" cfg.settings;
              # Uploads in flight get up to 30 s (DRAIN_DEADLINE), plus margin.
              stopTimeout = "60s";
              credentials = {
                link-token = cfg.credentials.linkToken;
                s3-secret = cfg.credentials.s3SecretAccessKey;
                api-tls-key = cfg.credentials.apiTlsKey;
              };
            }
            // import ./hardening.nix
            // {
              ProcSubset = "pid";
              # Rust all through: nothing apprepo runs needs writable executable memory.
              MemoryDenyWriteExecute = true;
              SystemCallFilter = [
                "@system-service"
                "~@privileged @resources"
              ];
            };
        };

        networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [
          (common.port cfg.settings.listen)
        ];
      }
    ]
  );
}
