# Platform.X as a Nix flake: the binaries, container images, NixOS modules for the three
# services, a development shell, and a NixOS VM test of the deploy cycle.
#
#   nix build .#apprepo          # or beacon, maestro, em; `default` has all four
#   nix build .#maestro-image    # a Docker image tarball: docker load < result
#   nix flake check              # builds everything, runs checks.<system>.vm-deploy-cycle
#   nix develop                  # cargo, clippy, rustfmt, rust-analyzer, python3, node, shellcheck
#
# NixOS: add `platformx.nixosModules.maestro` (or apprepo, beacon) to a system's modules and
# set `services.platformx.maestro.enable = true`; the options are in nix/modules/.
#
# Not built on the project's CI machines, which cannot reach nixpkgs: there, scripts/check-nix
# only parses these files (images/README.md says so too).
{
  description = "Platform.X, a self-hosted platform-as-a-service: apprepo, Beacon, Maestro and em";

  # The workspace needs Rust 1.94 (rust-version in Cargo.toml); nixos-unstable carries it.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      inherit ((lib.importTOML ./Cargo.toml).workspace.package) version repository;
      revision = self.rev or self.dirtyRev or "unknown";
    in
    {
      packages = forAllSystems (
        pkgs:
        let
          platformx = pkgs.callPackage ./nix/package.nix { inherit version; };
          # One package per binary, each a link into the one workspace build, so `nix run
          # .#beacon` starts Beacon and the modules' closures name what they run.
          binary =
            name: description:
            pkgs.runCommand "${name}-${version}"
              {
                meta = {
                  inherit (platformx.meta) homepage license platforms;
                  inherit description;
                  mainProgram = name;
                };
              }
              ''
                mkdir -p $out/bin
                ln -s ${platformx}/bin/${name} $out/bin/${name}
              '';
          binaries = {
            apprepo = binary "apprepo" "Platform.X apprepo: bundle uploads, storage and releases";
            beacon = binary "beacon" "Platform.X Beacon: the control plane";
            maestro = binary "maestro" "Platform.X Maestro: app instances and the HTTP proxy";
            em = binary "em" "em, the Platform.X command line";
          };
          # Flake packages must be derivations, so the images are packages of their own with an
          # -image suffix (a tarball for `docker load`) rather than an attribute set under one.
          image = import ./nix/image.nix {
            inherit
              pkgs
              version
              revision
              repository
              ;
          };
        in
        binaries
        // {
          default = platformx;
          inherit platformx;
          apprepo-image = image {
            name = "apprepo";
            package = binaries.apprepo;
            uid = 10001;
            ports = [ 7070 ];
            healthUrl = "https://127.0.0.1:7070/healthz";
            contents = [ pkgs.cacert ];
          };
          beacon-image = image {
            name = "beacon";
            package = binaries.beacon;
            uid = 10002;
            ports = [
              7080
              7443
            ];
            healthUrl = "https://127.0.0.1:7080/healthz";
          };
          maestro-image = image {
            name = "maestro";
            package = binaries.maestro;
            uid = 10003;
            ports = [
              8080
              8443
            ];
            healthUrl = "http://127.0.0.1:7090/healthz";
            # /bin/sh for the apps' `run`, python3 for the python examples, tini as PID 1 to
            # reap orphans (as in the Dockerfile's maestro stage).
            contents = [
              pkgs.dockerTools.binSh
              pkgs.coreutils
              pkgs.python3
              pkgs.cacert
            ];
            entrypoint = [
              "${pkgs.tini}/bin/tini"
              "--"
            ];
            extraDirs = [ "var/log/platformx" ];
          };
        }
      );

      nixosModules = {
        apprepo = import ./nix/modules/apprepo.nix self;
        beacon = import ./nix/modules/beacon.nix self;
        maestro = import ./nix/modules/maestro.nix self;
        default = {
          imports = [
            self.nixosModules.apprepo
            self.nixosModules.beacon
            self.nixosModules.maestro
          ];
        };
      };

      checks = forAllSystems (pkgs: {
        vm-deploy-cycle = pkgs.testers.runNixOSTest (import ./nix/tests/deploy-cycle.nix { inherit self pkgs; });
        # Everything builds, including the images.
        inherit (self.packages.${pkgs.stdenv.hostPlatform.system})
          platformx
          apprepo-image
          beacon-image
          maestro-image
          ;
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            pkgs.cargo
            pkgs.rustc
            pkgs.clippy
            pkgs.rustfmt
            pkgs.rust-analyzer
            # The example apps, and what Maestro's tests run.
            pkgs.python3
            pkgs.nodejs
            pkgs.shellcheck
            pkgs.openssl
          ];
        };
      });
    };
}
