# checks.<system>.vm-deploy-cycle: the deploy cycle on NixOS machines run from the flake's
# modules. `control` runs apprepo and Beacon, `web1` and `web2` a Maestro each (socket-activated
# on port 80); em on `control` deploys python-hello as release 1, then a changed one as
# release 2, and both web servers must serve each release, asked locally and over the network.
# Then release 3 has a `[build] command`: `web1`, the node that builds, builds it with the Nix
# Python of `build.runtimes`, which both web servers hold, and `web2`, which builds nothing,
# runs it on the Python the release carries (nix/modules/maestro.nix says why that works).
#
# Not run on the project's machines, which have neither nixpkgs nor a KVM that boots NixOS
# guests: `nix flake check` runs it where both are.
#
# The cluster's secrets are made at build time by images/init-secrets, the script compose's
# init container runs, so they sit in the world-readable Nix store: right for a throwaway test
# cluster only. The services get the private ones as credentials from /etc/platformx.
{ self, pkgs }:
let
  inherit (pkgs) lib;
  system = pkgs.stdenv.hostPlatform.system;
  secrets =
    pkgs.runCommand "platformx-test-secrets"
      {
        nativeBuildInputs = [ pkgs.openssl ];
        # Beacon's certificate names the host the others dial.
        # apprepo on the same host presents this certificate on its API too; em reaches both
        # APIs as localhost.
        BEACON_NAMES = "control,localhost";
        # Each web server's link token is bound to its node name: web1's is
        # maestro-link-token, web2's maestro-web2-link-token.
        MAESTRO_NODES = "web1,web2";
        # The build user cannot give files away; the services get them through root anyway.
        SET_OWNERS = "0";
      }
      ''
        bash ${../../images/init-secrets} $out
      '';
  # Private files as root-only copies under /etc/platformx, where LoadCredential= reads them.
  privateFiles =
    names:
    lib.genAttrs (map (name: "platformx/${name}") names) (path: {
      source = "${secrets}/${lib.removePrefix "platformx/" path}";
      mode = "0600";
    });
  # The runtimes releases are built with, alike on every Maestro: the builder links them into
  # its runtimes directory, and every web server keeps their closures.
  runtimes = [ pkgs.python3 ];
  webServer = name: builds: linkToken: {
    imports = [ self.nixosModules.maestro ];
    environment.etc = privateFiles [
      linkToken
      (if builds then "maestro-build-token" else "maestro-repo-token")
    ];
    environment.systemPackages = [ pkgs.curl ];
    services.platformx.maestro = {
      enable = true;
      openFirewall = true;
      build = {
        enable = builds;
        inherit runtimes;
      };
      settings = {
        node_name = name;
        beacon = {
          addr = "control:7443";
          ca_file = "${secrets}/ca.pem";
        };
      };
      credentials = {
        linkToken = "/etc/platformx/${linkToken}";
      }
      // (
        if builds then
          { buildToken = "/etc/platformx/maestro-build-token"; }
        else
          { repositoryToken = "/etc/platformx/maestro-repo-token"; }
      );
    };
  };
in
{
  name = "platformx-vm-deploy-cycle";

  nodes = {
    control = {
      imports = [
        self.nixosModules.apprepo
        self.nixosModules.beacon
      ];
      environment.etc = privateFiles [
        "apprepo-link-token"
        "beacon.key"
        "beacon-repo-token"
        "em-deploy-token"
      ];
      environment.systemPackages = [
        self.packages.${system}.em
        pkgs.curl
      ];
      services.platformx.apprepo = {
        enable = true;
        openFirewall = true;
        settings = {
          listen = "0.0.0.0:7070";
          tokens_file = "${secrets}/apprepo-tokens.toml";
          # HTTPS with the control host's certificate (Beacon's, for `control` and `localhost`).
          api_tls.cert_file = "${secrets}/beacon.pem";
          beacon = {
            addr = "control:7443";
            ca_file = "${secrets}/ca.pem";
          };
        };
        credentials.linkToken = "/etc/platformx/apprepo-link-token";
        credentials.apiTlsKey = "/etc/platformx/beacon.key";
      };
      services.platformx.beacon = {
        enable = true;
        openFirewall = true;
        settings = {
          http_listen = "0.0.0.0:7080";
          control_listen = "0.0.0.0:7443";
          tls_cert_file = "${secrets}/beacon.pem";
          tokens_file = "${secrets}/beacon-tokens.toml";
          domain = "example.test";
          repository = {
            url = "https://control:7070";
            ca_file = "${secrets}/ca.pem";
          };
        };
        credentials = {
          tlsKey = "/etc/platformx/beacon.key";
          repositoryToken = "/etc/platformx/beacon-repo-token";
        };
      };
    };
    web1 = webServer "web1" true "maestro-link-token";
    web2 = webServer "web2" false "maestro-web2-link-token";
  };

  testScript = ''
    webs = [web1, web2]

    def em(args):
        return control.succeed(f"HOME=/root em {args}")

    def serves(release, greeting):
        """Each web server answers with the release, on its own port 80 and from control."""
        page = "curl -fsS -H 'Host: python-hello.example.test' http://{}/"
        for web in webs:
            for out in [web.succeed(page.format("localhost")), control.succeed(page.format(web.name))]:
                assert f"release <code>{release}</code>" in out, out
                assert greeting in out, out

    start_all()
    control.wait_for_unit("apprepo.service")
    control.wait_for_unit("beacon.service")
    for web in webs:
        web.wait_for_unit("maestro-http.socket")
        web.wait_for_unit("maestro.service")

    em("login --remote https://localhost:7070 --beacon https://localhost:7080 --ca-file ${secrets}/ca.pem --token-file /etc/platformx/em-deploy-token")
    for web in webs:
        control.wait_until_succeeds(f"HOME=/root em status | grep -E '{web.name} +connected'", timeout=60)

    with subtest("release 1 reaches both web servers"):
        control.succeed("cp -r ${../../examples/python-hello} /root/app && chmod -R u+w /root/app")
        control.succeed("sed -i 's/^GREETING = .*/GREETING = \"first of two\"/' /root/app/app.toml")
        em("deploy /root/app")
        serves(1, "first of two")

    with subtest("release 2 replaces it on both"):
        control.succeed("sed -i 's/^GREETING = .*/GREETING = \"second of two\"/' /root/app/app.toml")
        em("deploy /root/app")
        serves(2, "second of two")
        assert "v2" in em("releases --app python-hello")

    with subtest("release 3 is built on web1 with the Nix Python, and web2 runs it on the release's copy"):
        web1.succeed("test -x /opt/platformx/runtimes/python3/${pkgs.python3.version}/bin/python3")
        control.succeed("sed -i 's/^GREETING = .*/GREETING = \"built on web1\"/' /root/app/app.toml")
        control.succeed("printf '\\n[build]\\ncommand = \"echo built-on-web1 > public/built.txt\"\\n' >> /root/app/app.toml")
        out = em("deploy /root/app")
        assert "python3 ${pkgs.python3.version}" in out and "from runtimes directory" in out, out
        serves(3, "built on web1")
        for web in webs:
            built = web.succeed("curl -fsS -H 'Host: python-hello.example.test' http://localhost/static/built.txt")
            assert "built-on-web1" in built, built
        # web2 builds nothing and its own Python is not on the app's path first: the instance's
        # interpreter is the release's .px/runtime, whose libraries are in the closure web2 holds.
        exe = web2.succeed("readlink /proc/$(pgrep -n -f 'server.py')/exe").strip()
        assert "/.px/runtime/bin/python3" in exe, exe
        # Each web server runs the app as the app's own uid (app-uids.json), not Maestro's:
        # the module grants Maestro the capabilities maestro.service does.
        for web in webs:
            uid = web.succeed("stat -c %u /proc/$(pgrep -n -f 'server.py')").strip()
            assert uid != web.succeed("id -u px-maestro").strip(), uid
            uids = web.succeed("cat /var/lib/platformx/maestro/app-uids.json")
            assert f'"python-hello": {uid}' in uids, (uid, uids)
  '';
}
