# What the three service modules share: the unit settings of systemd/*.service that are the same
# for each (Type=notify, the watchdog, restarts, reload), the service user, and the TOML
# rendering of `settings`.
{ lib, pkgs }:
rec {
  settingsFormat = pkgs.formats.toml { };

  # TOML has no null: a setting left null is left out, and the service uses its default.
  configFile =
    name: settings:
    settingsFormat.generate "${name}.toml" (lib.filterAttrsRecursive (_: v: v != null) settings);

  # Where systemd puts a unit's credentials (LoadCredential=): $CREDENTIALS_DIRECTORY.
  credentialsDir = unit: "/run/credentials/${unit}.service";

  # The port of a "host:port" listen address.
  port = address: lib.toInt (lib.last (lib.splitString ":" address));

  # A setting of the path of a file outside the Nix store (the store is world-readable).
  secretPath =
    description:
    lib.mkOption {
      type = lib.types.nullOr (
        lib.types.addCheck lib.types.str (p: lib.hasPrefix "/" p && !lib.hasPrefix builtins.storeDir p)
        // {
          description = "absolute path outside the Nix store";
        }
      );
      default = null;
      example = "/etc/platformx/secret";
      description = ''
        ${description} A file outside the Nix store, readable by root: systemd copies it into the
        service's credentials directory at start (`LoadCredential=`), readable by the service
        alone, and points the setting at the copy.
      '';
    };

  # The unit settings of systemd/<service>.service besides the sandbox.
  serviceConfig =
    {
      name,
      package,
      configFile,
      stopTimeout,
      credentials,
    }:
    {
      # READY=1 once the listeners are open and the state is good.
      Type = "notify";
      NotifyAccess = "main";
      ExecStart = "${lib.getExe package} --config ${configFile}";
      # SIGHUP reads the configuration again (RELOADING=1 ... READY=1).
      ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
      # The service pings every 15 s while its own liveness probe passes.
      WatchdogSec = "30s";
      Restart = "on-failure";
      RestartSec = "2s";
      # 78 (EX_CONFIG) is a bad configuration, which a restart cannot fix.
      RestartPreventExitStatus = 78;
      TimeoutStopSec = stopTimeout;
      User = "px-${name}";
      Group = "px-${name}";
      StateDirectory = "platformx/${name}";
      StateDirectoryMode = "0700";
      LoadCredential = lib.mapAttrsToList (id: path: "${id}:${path}") (
        lib.filterAttrs (_: path: path != null) credentials
      );
    };

  # The service's system user and group, as systemd/sysusers.d/platformx.conf makes them.
  user = name: description: {
    users.users."px-${name}" = {
      isSystemUser = true;
      group = "px-${name}";
      inherit description;
      home = "/var/lib/platformx/${name}";
    };
    users.groups."px-${name}" = { };
  };
}
