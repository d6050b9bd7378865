# A service image built by Nix (dockerTools.buildLayeredImage), laid out like the Dockerfile's:
# the binary, /etc/platformx/<name>.toml from images/, the px-healthcheck HEALTHCHECK, a fixed
# non-root uid owning the state directory, secrets expected under /run/secrets.
{
  pkgs,
  version,
  revision,
  # The source repository (Cargo.toml's workspace.package.repository).
  repository,
}:
{
  name,
  package,
  uid,
  ports,
  healthUrl,
  contents ? [ ],
  # Run before the binary (Maestro's tini).
  entrypoint ? [ ],
  # More directories the service user owns, besides its state directory.
  extraDirs ? [ ],
}:
let
  inherit (pkgs) lib;
  user = "px-${name}";
  id = toString uid;
  stateDir = "var/lib/platformx/${name}";
  ownedDirs = [ stateDir ] ++ extraDirs;
  # The service user and root alone, as the Dockerfile's useradd leaves them.
  accounts = pkgs.runCommand "platformx-${name}-accounts" { } ''
    mkdir -p $out/etc
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
      '${user}:x:${id}:${id}:Platform.X ${name}:/${stateDir}:/sbin/nologin' >$out/etc/passwd
    printf '%s\n' 'root:x:0:' '${user}:x:${id}:' >$out/etc/group
  '';
  files = pkgs.runCommand "platformx-${name}-files" { } ''
    install -D -m 0644 ${../images + "/${name}.toml"} $out/etc/platformx/${name}.toml
    mkdir -p $out/usr/local/bin
    # The check's tools by store path (the images carry no PATH of their own): coreutils'
    # timeout, mktemp, head and tr, and openssl's s_client for https:// URLs.
    substitute ${../images/healthcheck} $out/usr/local/bin/px-healthcheck \
      --replace-fail '#!/bin/bash' '#!${pkgs.bash}/bin/bash' \
      --replace-fail 'set -euo pipefail' 'set -euo pipefail; PATH=${
        lib.makeBinPath [
          pkgs.coreutils
          pkgs.openssl
        ]
      }'
    chmod 0755 $out/usr/local/bin/px-healthcheck
  '';
  # Docker's durations are nanoseconds.
  seconds = s: s * 1000000000;
in
pkgs.dockerTools.buildLayeredImage {
  name = "platformx/${name}";
  tag = version;
  contents = [
    package
    accounts
    files
  ]
  ++ contents;
  fakeRootCommands = ''
    mkdir -p ${lib.concatStringsSep " " ownedDirs} tmp run/secrets
    chown ${id}:${id} ${lib.concatStringsSep " " ownedDirs}
    chmod 0700 ${lib.concatStringsSep " " ownedDirs}
    chmod 1777 tmp
  '';
  config = {
    User = "${id}:${id}";
    WorkingDir = "/${stateDir}";
    Entrypoint = entrypoint ++ [
      (lib.getExe package)
      "--config"
      "/etc/platformx/${name}.toml"
    ];
    Env = [
      "PX_HEALTHCHECK_URL=${healthUrl}"
    ]
    ++ lib.optional (builtins.elem pkgs.cacert contents) "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt";
    ExposedPorts = lib.listToAttrs (
      map (port: lib.nameValuePair "${toString port}/tcp" { }) ports
    );
    StopSignal = "SIGTERM";
    Healthcheck = {
      Test = [
        "CMD"
        "/usr/local/bin/px-healthcheck"
      ];
      Interval = seconds 30;
      Timeout = seconds 10;
      StartPeriod = seconds 20;
      Retries = 3;
    };
    Labels = {
      "org.opencontainers.image.title" = "Platform.X ${name}";
      "org.opencontainers.image.licenses" = "Apache-2.0";
      "org.opencontainers.image.version" = version;
      "org.opencontainers.image.revision" = revision;
      "org.opencontainers.image.source" = repository;
    };
  };
}
